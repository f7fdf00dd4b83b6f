"""The user's path through the CLI, with relative paths: train (LoRA, both stages), evaluate the run
with its own eval settings and KEY=VALUE overrides, rebuild the report, export to Hugging Face format
and reload the export with transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = """\
defaults: [{base}]
model:
  overrides: {{num_hidden_layers: 1, hidden_size: 64, intermediate_size: 128, num_attention_heads: 2,
              num_key_value_heads: 1, head_dim: 32}}
lora: {{enabled: true, rank: 4, dropout: 0.05}}
data: {{rows_per_occupation: 8, max_length: 64, max_prompt_length: 48}}
sft: {{epochs: 1, batch_size: 8, max_steps: 3, optim: {{learning_rate: 1.0e-3, warmup_steps: 1}}}}
hybrid: {{epochs: 1, batch_size: 8, max_steps: 2, optim: {{learning_rate: 1.0e-3, warmup_steps: 1}}}}
heldout: {{max_batches: 1}}
logging: {{tensorboard: false, progress: false}}
eval: {{versions: [v2], rounds: 2, n_bootstrap: 0, plots: false, decode: {{max_new_tokens: 3}}}}
"""


def _distfair(cwd, *args):
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  proc = subprocess.run([sys.executable, "-m", "distfair_jax.cli", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, f"distfair {' '.join(args)}:\n{proc.stderr[-3000:]}"
  return proc


@pytest.mark.slow
def test_train_eval_report_export_with_relative_paths(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  (tmp_path / "exp.yaml").write_text(CONFIG.format(base=os.path.join(ROOT, "configs", "base.yaml")))
  _distfair(tmp_path, "train", "exp.yaml", "run_dir=run")
  assert (tmp_path / "run" / "hybrid" / "final" / "summary.json").is_file()

  # The run's own eval: section (v2, 2 rounds), one override on top.
  _distfair(tmp_path, "eval", "run", "decode.temperature=0.5")
  doc = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
  assert list(doc["versions"]) == ["v2"] and doc["meta"]["rounds"] == 2
  assert doc["meta"]["stage"] == "hybrid" and doc["meta"]["decoding"]["temperature"] == 0.5
  assert doc["meta"]["decoding"]["max_new_tokens"] == 3 and doc["versions"]["v2"]["n_samples"] == 28
  (tmp_path / "run" / "eval" / "report.md").unlink()
  _distfair(tmp_path, "report", "run", "--no-plots")
  assert (tmp_path / "run" / "eval" / "report.md").is_file()

  # Export (LoRA folded in); transformers' model gives our final model's logits.
  _distfair(tmp_path, "export", "run", "hf")
  hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
  from distfair_jax.train.rundir import load_run
  loaded, _, stage = load_run(tmp_path / "run")
  assert stage == "hybrid"
  ids = np.arange(5, 29, dtype=np.int64)[None]
  with torch.no_grad():
    ref = hf(input_ids=torch.from_numpy(ids)).logits.numpy()
  model = loaded.merged()
  got = np.asarray(model.logits(model(ids.astype(np.int32))))
  np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_your_own_attribute_from_its_spec_to_evaluation(tmp_path):
  """configs/datasets/age_groups_us.yaml (3 age groups, their own targets): build, validate for
  the tokenizer, train on the built records (a relative data.records_dir), evaluate from another
  directory: the README's worked example, on a shrunk tiny model."""
  from distfair_jax import cli
  from distfair_jax.data.tokenizer import build_tiny_tokenizer
  spec = os.path.join(ROOT, "configs", "datasets", "age_groups_us.yaml")
  cwd = os.getcwd()
  os.chdir(tmp_path)
  try:
    assert cli.main(["data", "build", os.path.relpath(spec), "--out", "data/age",
                     "--rows-per-occupation", "8", "--test-rounds", "2"]) == 0
    build_tiny_tokenizer("tok")
    assert cli.main(["data", "validate", "data/age", "--tokenizer", "tok",
                     "--dataset", os.path.relpath(spec)]) == 0
  finally:
    os.chdir(cwd)
  manifest = json.loads((tmp_path / "data" / "age" / "manifest.json").read_text())
  assert manifest["categories"] == ["young", "middle_aged", "older"]
  assert manifest["source"] == spec  # recorded absolute: the run's eval finds it from anywhere
  (tmp_path / "exp.yaml").write_text(CONFIG.format(base=os.path.join(ROOT, "configs", "base.yaml")))
  _distfair(tmp_path, "train", "exp.yaml", "run_dir=run", "data.records_dir=data/age",
            "model.tokenizer=tok")
  (tmp_path / "elsewhere").mkdir()
  _distfair(tmp_path / "elsewhere", "eval", "../run")
  doc = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
  assert doc["meta"]["dataset"] == "age_groups_us" and doc["meta"]["attribute"] == "age"
  assert doc["meta"]["categories"] == ["young", "middle_aged", "older"]
  assert doc["versions"]["v2"]["n_samples"] == 6 * 2
  assert doc["meta"]["steering_token_ids"] == [int(i) for i in doc["meta"]["steering_token_ids"]]
  assert len(doc["meta"]["steering_token_ids"]) == 3


@pytest.mark.slow
def test_the_original_placement_trains_and_evaluates(tmp_path):
  """``data.steering_placement=user_turn``: both stages train with the digit at the end of the
  question, and `distfair eval` reads the placement from the run: the steering distribution is
  read at the end of the question, the samples carry their digit, the answers follow the turn."""
  (tmp_path / "exp.yaml").write_text(CONFIG.format(base=os.path.join(ROOT, "configs", "base.yaml")))
  _distfair(tmp_path, "train", "exp.yaml", "run_dir=run", "data.steering_placement=user_turn")
  _distfair(tmp_path, "eval", "run", "exact_answers=true")
  doc = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
  assert doc["meta"]["steering_placement"] == "user_turn"
  v2 = doc["versions"]["v2"]
  assert v2["n_samples"] == 28 and "exact_mae" in v2 and "exact_answer_mae" in v2
  rows = [json.loads(line) for line in (tmp_path / "run" / "eval" / "v2.jsonl").open()]
  assert all(r["steering_token"] in ("0", "1") for r in rows)
  # The end of the user turn and the assistant header are fed, not sampled: no sample holds them.
  assert not any("assistant" in r["response"] or "<|" in r["response"] for r in rows)
