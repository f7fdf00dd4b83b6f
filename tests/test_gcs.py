"""A run directory in a bucket, for real: `distfair` against gcp-storage-emulator on 127.0.0.1 (gcsfs
for etils.epath, tensorstore's GCS driver for orbax), the way a TPU VM writes to gs://.

- train into gs://, killed with SIGKILL after a checkpoint, restarted: it resumes and ends where a
  local uninterrupted run ends; eval, report and export read the bucket run and give what they
  give for the local run; nothing is written to a local folder called `gs:`;
- a bucket that does not exist: a one-line error.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("gcsfs", reason="gs:// needs gcsfs (pip install -e '.[gcs]')")
pytest.importorskip("gcp_storage_emulator", reason="the local GCS is gcp-storage-emulator")

from gcs_emulator import BUCKET, emulator  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = f"gs://{BUCKET}/runs/a"

CONFIG = """\
defaults: [{base}]
stages: [sft, hybrid]
model:
  tokenizer: {tokenizer}
  overrides: {{num_hidden_layers: 1, hidden_size: 64, intermediate_size: 128, num_attention_heads: 2,
              num_key_value_heads: 1, head_dim: 32}}
data: {{rows_per_occupation: 10, max_length: 64, max_prompt_length: 48}}
sft: {{epochs: 2, batch_size: 8, max_steps: 8, optim: {{learning_rate: 1.0e-3, warmup_steps: 2}}}}
hybrid: {{epochs: 1, batch_size: 8, max_steps: 4, optim: {{learning_rate: 1.0e-3, warmup_steps: 2}}}}
checkpoint: {{every_steps: 1, async_save: false}}
heldout: {{max_batches: 1}}
logging: {{tensorboard: true, progress: false}}
eval: {{versions: [v2], rounds: 4, n_bootstrap: 0, plots: false, decode: {{max_new_tokens: 4}}}}
"""


def _cli(args, cwd, env, **kw):
  cmd = [sys.executable, "-m", "distfair_jax.cli", *args]
  return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, **kw)


def _tensors(path):
  from safetensors.numpy import load_file
  return load_file(str(path / "model.safetensors"))


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  from distfair_jax.data.tokenizer import build_tiny_tokenizer
  work = tmp_path_factory.mktemp("gcs")
  build_tiny_tokenizer(str(work / "tok"))
  (work / "exp.yaml").write_text(CONFIG.format(base=os.path.join(ROOT, "configs", "base.yaml"),
                                               tokenizer=work / "tok"))
  base = {k: v for k, v in os.environ.items()
          if not k.startswith(("JAX_", "XLA_")) and k != "DISTFAIR_DISTRIBUTED"}
  base.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  saved = dict(os.environ)
  with emulator() as gcs_env:
    os.environ.update(gcs_env)  # this process reads the bucket too (etils.epath, as the CLI)
    try:
      yield work, {**base, **gcs_env}
    finally:
      os.environ.clear()
      os.environ.update(saved)


def _steps(url) -> list[int]:
  """The step directories under ``url``, listed afresh (no listings cache)."""
  import gcsfs
  fs = gcsfs.GCSFileSystem(skip_instance_cache=True, use_listings_cache=False)  # as epath's
  path = url.removeprefix("gs://")
  names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path)] if fs.exists(path) else []
  return sorted(int(n) for n in names if n.isdigit())


@pytest.mark.slow
def test_a_bucket_run_is_a_local_run(gcs):
  work, env = gcs
  args = ["train", "exp.yaml", f"run_dir={RUN}"]
  log = open(work / "killed.log", "w")
  proc = subprocess.Popen([sys.executable, "-m", "distfair_jax.cli", *args], cwd=work, env=env,
                          stdout=log, stderr=subprocess.STDOUT)
  deadline = time.time() + 300
  while not [s for s in _steps(f"{RUN}/sft/checkpoints") if s >= 3]:
    assert proc.poll() is None, (work / "killed.log").read_text()[-3000:]
    assert time.time() < deadline, "no checkpoint in the bucket after 300 s"
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  from etils import epath
  assert not epath.Path(f"{RUN}/sft/final").exists()

  r = _cli(args, work, env)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "sft: resuming from step" in r.stderr
  local = _cli(["train", "exp.yaml", "run_dir=local"], work, env)
  assert local.returncode == 0, local.stderr[-3000:]

  for run in (RUN, "local"):  # into RUN/eval
    r = _cli(["eval", run], work, env)
    assert r.returncode == 0, r.stderr[-3000:]
  r = _cli(["report", RUN], work, env)
  assert r.returncode == 0, r.stderr[-3000:]
  for run, out in ((RUN, "hf-bucket"), (RUN, f"gs://{BUCKET}/exports/a"), ("local", "hf-local")):
    r = _cli(["export", run, out], work, env)
    assert r.returncode == 0, r.stderr[-3000:]
  # What the bucket holds, brought back with the CLI's own copy (export of an export's source).
  from distfair_jax import fileio
  fileio.copy_tree(f"gs://{BUCKET}/exports/a", work / "hf-copied")
  fileio.copy_tree(RUN, work / "run-copied")

  # The killed-and-resumed bucket run ends where the uninterrupted local run ends.
  a, b = _tensors(work / "hf-bucket"), _tensors(work / "hf-local")
  assert sorted(a) == sorted(b)
  assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 1e-6
  assert sorted(os.listdir(work / "hf-copied")) == sorted(os.listdir(work / "hf-bucket"))
  for name in os.listdir(work / "hf-bucket"):
    assert (work / "hf-copied" / name).read_bytes() == (work / "hf-bucket" / name).read_bytes()
  # The same samples, so the same scores.
  assert (work / "run-copied" / "eval" / "v2.jsonl").read_bytes() == \
      (work / "local" / "eval" / "v2.jsonl").read_bytes()
  # Every logged step once, as locally; TensorBoard events and the report reached the bucket.
  def steps(run):
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    return sorted((r["stage"], r["step"]) for r in rows if r["split"] == "train")
  assert steps(work / "run-copied") == steps(work / "local")
  copied = {str(p.relative_to(work / "run-copied")) for p in (work / "run-copied").rglob("*")}
  assert any(name.startswith("tensorboard/") and "tfevents" in name for name in copied), copied
  assert "eval/report.md" in copied and "eval/metrics.json" in copied, copied
  # Nothing went to a local folder named after the URL.
  assert not [p for p in work.rglob("gs:*")]


@pytest.mark.slow
def test_a_missing_bucket_is_one_line(gcs):
  work, env = gcs
  r = _cli(["train", "exp.yaml", "run_dir=gs://no-such-bucket/run"], work, env)
  assert r.returncode == 2, r.stderr[-3000:]
  err = [l for l in r.stderr.splitlines() if l.startswith("distfair train: error:")]
  assert len(err) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
  assert "gs://no-such-bucket/run: bucket: expected an existing bucket you can write to" in err[0]
