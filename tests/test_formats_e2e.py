"""The user's path on the paper's real model formats, with relative paths, through the CLI.

For Llama-3.2-Instruct and Qwen2.5-Instruct (../shared/fixtures/hf-formats; skipped, saying why,
where absent): a shrunk random-weight Hugging Face directory of the real format (2 layers, hidden
64, the REAL vocabulary size, rope settings, tying and model_type kept; the real tokenizer files,
generation_config.json) goes through convert hf-to-flax, convert check, data build + validate
--tokenizer, train (SFT then hybrid, LoRA, a few steps; a first attempt that fails at model load
must not block the corrected command), eval (from another directory, on "another day"), export,
and transformers reloads the export: same chat template, generation_config.json and eos, generate
runs, and the exported tokenizer files are the source's byte for byte (what transformers 4.x loads
from the published checkpoints).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from hf_formats import ROOT, family_dir

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")
SHRINK = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
          "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32}
# Run the evaluation "on another day": transformers' strftime_now (Llama 3.x's Today Date) reads
# this clock.
FAKE_DAY = """\
import datetime as _dt
import transformers.utils.chat_template_utils as _ctu
class _Day(_dt.datetime):
  @classmethod
  def now(cls, tz=None):
    return cls(2031, 3, 9, 12, 0, 0)
_ctu.datetime = _Day
"""

CONFIG = """\
defaults: [{base}]
model: {{checkpoint: ckpt}}
lora: {{enabled: true, rank: 4}}
data: {{rows_per_occupation: 2, max_length: 112, max_prompt_length: 96, {data}}}
sft: {{epochs: 1, batch_size: 4, max_steps: 2, optim: {{learning_rate: 1.0e-3, warmup_steps: 1}}}}
hybrid: {{epochs: 1, batch_size: 4, max_steps: 2, optim: {{learning_rate: 1.0e-3, warmup_steps: 1}}}}
heldout: {{max_batches: 1}}
logging: {{tensorboard: false, progress: false}}
eval: {{versions: [v2], rounds: 2, n_bootstrap: 0, plots: false, decode: {{max_new_tokens: 3}}}}
"""
FAMILIES = {
    "llama-3.2-instruct": "chat_template_kwargs: {date_string: 26 Jul 2024}",
    "qwen2.5-instruct": "system_prompt: none",
}


def _hf_dir(family: str, out) -> dict:
  """A shrunk random-weight model of the family's real format, its real tokenizer files."""
  import shutil
  import torch
  import transformers
  src = family_dir(family)
  with open(os.path.join(src, "config.json"), encoding="utf-8") as f:
    config = json.load(f)
  config.update(SHRINK)
  config.pop("torch_dtype", None)
  out.mkdir()
  (out / "config.json").write_text(json.dumps(config, indent=2))
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(
      transformers.AutoConfig.from_pretrained(out), dtype=torch.float32)
  model.save_pretrained(out)
  (out / "config.json").write_text(json.dumps(config, indent=2))  # the real format, shrunk
  for name in TOKENIZER_FILES:
    if os.path.exists(os.path.join(src, name)):
      shutil.copyfile(os.path.join(src, name), out / name)
  return config


def _distfair(cwd, *args, env_extra=None, ok=True):
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
             PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
  env.update(env_extra or {})
  proc = subprocess.run([sys.executable, "-m", "distfair_jax.cli", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=900)
  if ok:
    assert proc.returncode == 0, f"distfair {' '.join(args)}:\n{proc.stderr[-3000:]}"
  return proc


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_user_path_on_the_real_format(family, tmp_path, monkeypatch, capsys):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from distfair_jax import cli
  src = family_dir(family)
  config = _hf_dir(family, tmp_path / "hf")
  assert config["vocab_size"] in (128256, 151936)
  monkeypatch.chdir(tmp_path)

  # Convert (relative paths), compare logits, build and check the data for this tokenizer.
  assert cli.main(["convert", "hf-to-flax", "hf", "ckpt", "--dtype", "float32"]) == 0
  assert cli.main(["convert", "check", "hf", "ckpt"]) == 0
  assert "OK: max abs logit difference" in capsys.readouterr().out
  assert cli.main(["data", "build", "gender_real_us", "--out", "data", "--rows-per-occupation",
                   "2", "--test-rounds", "1"]) == 0
  assert cli.main(["data", "validate", "data", "--tokenizer", "hf"]) == 0
  assert "data: ok" in capsys.readouterr().out

  # A first attempt that fails at model load leaves a run directory whose stages never started:
  # the corrected command is not "a run with a different config".
  (tmp_path / "exp.yaml").write_text(CONFIG.format(base=os.path.join(ROOT, "configs", "base.yaml"),
                                                   data=FAMILIES[family]))
  first = _distfair(tmp_path, "train", "exp.yaml", "run_dir=run", "model.checkpoint=ckpt-typo",
                    ok=False)
  assert first.returncode == 2 and "ckpt-typo" in first.stderr.strip().splitlines()[-1]
  _distfair(tmp_path, "train", "exp.yaml", "run_dir=run")
  run_cfg = (tmp_path / "run" / "config.yaml").read_text()
  assert f"checkpoint: {tmp_path / 'ckpt'}" in run_cfg  # recorded absolute
  trained = json.loads((tmp_path / "run" / "prompt.json").read_text())

  # Evaluate from another directory, on another day: the prompts are training's, byte for byte.
  (tmp_path / "elsewhere").mkdir()
  (tmp_path / "fakeday").mkdir()
  (tmp_path / "fakeday" / "sitecustomize.py").write_text(FAKE_DAY)
  day = os.pathsep.join([str(tmp_path / "fakeday"), ROOT, os.environ.get("PYTHONPATH", "")])
  _distfair(tmp_path / "elsewhere", "eval", "../run", env_extra={"PYTHONPATH": day})
  meta = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())["meta"]
  assert meta["prompt_example"] == trained
  assert meta["stop_token_ids"] == ([128001, 128008, 128009] if "llama" in family
                                    else [151643, 151645])
  if "llama" in family:
    assert "Today Date: 26 Jul 2024" in trained["text"]
  else:
    assert trained["text"].startswith("<|im_start|>user\n")  # no default system prompt
  rows = [json.loads(l) for l in (tmp_path / "run" / "eval" / "v2.jsonl").read_text().splitlines()]
  assert len(rows) == 28 and all(r["steering_token"] in ("0", "1") for r in rows)

  # Export; transformers reloads it as the source model's format.
  _distfair(tmp_path, "export", "run", "hf_out")
  out = tmp_path / "hf_out"
  for name in TOKENIZER_FILES:
    if os.path.exists(os.path.join(src, name)):
      assert (out / name).read_bytes() == (tmp_path / "hf" / name).read_bytes(), name
      assert stat.S_IMODE(os.stat(out / name).st_mode) & 0o044 == 0o044, name  # readable by all
  exported = json.loads((out / "config.json").read_text())
  for key in ("model_type", "vocab_size", "tie_word_embeddings", "eos_token_id", "bos_token_id",
              "rope_theta"):
    assert exported[key] == config[key], key
  if config.get("rope_scaling"):
    assert exported["rope_scaling"] == config["rope_scaling"]
  tok_src = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
  tok_out = transformers.AutoTokenizer.from_pretrained(out)
  msgs = [{"role": "user", "content": "Is this person male or female?"}]
  kwargs = {"date_string": "26 Jul 2024"}
  assert tok_out.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False, **kwargs) \
      == tok_src.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False, **kwargs)
  assert tok_out.eos_token_id == tok_src.eos_token_id and len(tok_out) == len(tok_src)
  gen = transformers.GenerationConfig.from_pretrained(out)
  with open(os.path.join(src, "generation_config.json"), encoding="utf-8") as f:
    assert gen.eos_token_id == json.load(f)["eos_token_id"]
  model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
  ids = tok_out.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                                    return_dict=True, **kwargs)
  with torch.no_grad():
    new = model.generate(**ids, max_new_tokens=4, do_sample=False)
  assert new.shape[1] == ids["input_ids"].shape[1] + 4 or \
      int(new[0, -1]) in set(gen.eos_token_id)
