"""The pod path for real, on one machine: `distfair` as 2 JAX processes x 4 CPU devices (gloo
collectives), started by launch/local/multihost.sh, against 1 process x 8 devices.

- training: the same final parameters and logged losses; a process killed with SIGKILL, then both
  restarted, ends where an uninterrupted run ends; a 2-process checkpoint resumes in 1 process;
  SIGTERM to one process stops every process at the same step with a checkpoint (exit 143);
- evaluation and export (of a LoRA run on loaded weights): the same samples and the same files with
  2 processes as with 1;
- bad input: a coordinator that never answers, a batch that does not split over the processes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(ROOT, "launch", "local", "multihost.sh")

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
logging: {{tensorboard: false, progress: false}}
eval: {{versions: [v2], rounds: 4, n_bootstrap: 0, plots: false, decode: {{max_new_tokens: 4}}}}
"""


def _env(**extra) -> dict:
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("JAX_", "XLA_")) and k != "DISTFAIR_DISTRIBUTED"}
  env.update(PYTHON=sys.executable, PYTHONUNBUFFERED="1", **extra)
  return env


def _rehearsal(n, args, cwd, *, devices=4, timeout=600, logs="logs"):
  """`launch/local/multihost.sh N distfair ARGS` (blocking)."""
  cmd = [LAUNCHER, "--devices-per-process", str(devices), "--log-dir", str(cwd / logs), str(n),
         *args]
  r = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
  logs = "".join((cwd / logs / f"process-{i}.log").read_text() for i in range(n)
                 if (cwd / logs / f"process-{i}.log").exists())
  return r, logs


def _single(args, cwd, *, timeout=600):
  """`distfair ARGS` as one process with 8 CPU devices."""
  env = _env(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
  return subprocess.run([sys.executable, "-m", "distfair_jax.cli", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=timeout)


def _processes(n, args, cwd, logs):
  """N training processes started by hand (so that one can be signalled), as the launcher does."""
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  (cwd / logs).mkdir(exist_ok=True)
  procs = []
  for i in range(n):
    env = _env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(n),
               JAX_PROCESS_ID=str(i), JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
               XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    log = open(cwd / logs / f"process-{i}.log", "w")
    procs.append(subprocess.Popen([sys.executable, "-m", "distfair_jax.cli", *args], cwd=cwd,
                                  env=env, stdout=log, stderr=subprocess.STDOUT))
  return procs


def _wait_for(path, timeout=300, procs=()):
  deadline = time.time() + timeout
  while not path.exists():
    assert all(p.poll() is None for p in procs), "a process ended early"
    assert time.time() < deadline, f"no {path} after {timeout}s"
    time.sleep(0.05)


def _final(run, stage="hybrid"):
  from distfair_jax.model import checkpoint_io
  return jax.tree.leaves(checkpoint_io.load_params(run / stage / "final" / "params"))


def _max_diff(a, b, stage="hybrid") -> float:
  return max(float(np.abs(x - y).max()) for x, y in zip(_final(a, stage), _final(b, stage)))


def _losses(run):
  rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
  return {(r["stage"], r["step"]): r["loss"] for r in rows if r["split"] == "train"}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
  """A working directory with the experiment (relative paths below it), and the 2-process run."""
  from distfair_jax.data.tokenizer import build_tiny_tokenizer
  d = tmp_path_factory.mktemp("multihost")
  build_tiny_tokenizer(str(d / "tok"))
  (d / "exp.yaml").write_text(CONFIG.format(base=os.path.join(ROOT, "configs", "base.yaml"),
                                            tokenizer=d / "tok"))
  r, logs = _rehearsal(2, ["train", "exp.yaml", "run_dir=two"], d)
  assert r.returncode == 0, logs[-3000:]
  return d


@pytest.mark.slow
def test_two_processes_train_like_one(work):
  r = _single(["train", "exp.yaml", "run_dir=one"], work)
  assert r.returncode == 0, r.stderr[-3000:]
  assert _max_diff(work / "one", work / "two") <= 1e-5
  a, b = _losses(work / "one"), _losses(work / "two")
  assert sorted(a) == sorted(b) and len(a) == 12  # every step of both stages, logged once
  for key in a:
    assert a[key] == pytest.approx(b[key], rel=1e-5), key


@pytest.fixture(scope="module")
def lora_runs(work):
  """The real-model path: base weights read from a params directory straight onto the global mesh,
  LoRA adapters (and their dropout keys) initialised by every process alike and made global; run
  with 2 processes (``lora2``) and with 1 (``lora1``)."""
  args = ["train", "exp.yaml", "stages=[sft]", "sft.max_steps=3",
          "model.params=two/sft/final/params", "lora.enabled=true", "lora.targets=[all-linear]",
          "lora.dropout=0.05"]
  r, logs = _rehearsal(2, [*args, "run_dir=lora2"], work, logs="logs-lora")
  assert r.returncode == 0, logs[-3000:]
  r = _single([*args, "run_dir=lora1"], work)
  assert r.returncode == 0, r.stderr[-3000:]
  return work / "lora1", work / "lora2"


@pytest.mark.slow
def test_adapters_on_loaded_weights_train_alike_with_two_processes(lora_runs):
  one, two = lora_runs
  assert _max_diff(one, two, "sft") <= 1e-5
  a, b = _losses(one), _losses(two)
  assert sorted(a) == sorted(b) and len(a) == 3
  for key in a:
    assert a[key] == pytest.approx(b[key], rel=1e-5), key


@pytest.mark.slow
def test_evaluation_and_export_are_the_same_with_two_processes(work, lora_runs):
  # Evaluation of a run of full weights; export of a LoRA run (base weights from a params
  # directory, the adapters from the run, merged on the global mesh).
  r, logs = _rehearsal(2, ["eval", "two", "--out", "eval2"], work, logs="logs-eval")
  assert r.returncode == 0, logs[-3000:]
  r = _single(["eval", "two", "--out", "eval1"], work)
  assert r.returncode == 0, r.stderr[-3000:]
  assert (work / "eval2" / "eval" / "v2.jsonl").read_bytes() == \
      (work / "eval1" / "eval" / "v2.jsonl").read_bytes()
  r, logs = _rehearsal(2, ["export", "lora1", "hf2"], work, logs="logs-export")
  assert r.returncode == 0, logs[-3000:]
  assert _single(["export", "lora1", "hf1"], work).returncode == 0
  names = sorted(os.listdir(work / "hf1"))
  assert names == sorted(os.listdir(work / "hf2")) and "model.safetensors" in names
  for name in names:
    assert (work / "hf1" / name).read_bytes() == (work / "hf2" / name).read_bytes(), name


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["rows", "packed"])
def test_a_pooled_reference_cache_with_two_processes_trains_like_one(work, layout):
  # Every process pools the global batches; the chunks' rows and each step's reference split over
  # the processes (reference_cache), in the rows layout's order for both layouts.
  args = ["train", "exp.yaml", "stages=[hybrid]", "hybrid.reference=cached",
          f"hybrid.layout={layout}", "hybrid.epochs=2", "hybrid.max_steps=0",
          "hybrid.batch_size=16"]
  r, logs = _rehearsal(2, [*args, f"run_dir=cache2-{layout}"], work, logs=f"logs-cache-{layout}")
  assert r.returncode == 0, logs[-3000:]
  assert "hybrid: reference log-probs computed before the stage, once per distinct" in logs
  work_one, work_two = work / f"cache1-{layout}", work / f"cache2-{layout}"
  r = _single([*args, f"run_dir=cache1-{layout}"], work)
  assert r.returncode == 0, r.stderr[-3000:]
  assert _max_diff(work_one, work_two) <= 1e-5
  a, b = _losses(work_one), _losses(work_two)
  assert sorted(a) == sorted(b) and len(a) >= 4
  for key in a:
    assert a[key] == pytest.approx(b[key], rel=1e-5), key


@pytest.mark.slow
def test_sigkill_then_restart_reaches_the_uninterrupted_result(work):
  args = ["train", "exp.yaml", "run_dir=killed"]
  procs = _processes(2, args, work, "logs-kill")
  _wait_for(work / "killed" / "sft" / "checkpoints" / "3", procs=procs)
  procs[1].send_signal(signal.SIGKILL)  # one host lost ...
  procs[1].wait()
  procs[0].send_signal(signal.SIGKILL)  # ... and the job taken down with it
  procs[0].wait()
  assert not (work / "killed" / "sft" / "final").exists()
  r, logs = _rehearsal(2, args, work, logs="logs-resume")
  assert r.returncode == 0, logs[-3000:]
  assert "sft: resuming from step" in logs
  assert _max_diff(work / "killed", work / "two") <= 1e-6
  assert sorted(_losses(work / "killed")) == sorted(_losses(work / "two"))


@pytest.mark.slow
def test_a_two_process_checkpoint_resumes_in_one_process(work):
  args = ["train", "exp.yaml", "run_dir=moved"]
  procs = _processes(2, args, work, "logs-moved")
  _wait_for(work / "moved" / "sft" / "checkpoints" / "3", procs=procs)
  for p in procs:
    p.send_signal(signal.SIGKILL)
    p.wait()
  r = _single(args, work)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "sft: resuming from step" in r.stderr
  assert _max_diff(work / "moved", work / "two") <= 1e-5


@pytest.mark.slow
def test_sigterm_to_one_process_stops_all_at_the_same_step(work):
  args = ["train", "exp.yaml", "run_dir=term", "sft.max_steps=200", "checkpoint.every_steps=0"]
  procs = _processes(2, args, work, "logs-term")
  _wait_for(work / "term" / "metrics.jsonl", procs=procs)
  procs[1].send_signal(signal.SIGTERM)
  codes = [p.wait(timeout=300) for p in procs]
  assert codes == [143, 143]
  steps = os.listdir(work / "term" / "sft" / "checkpoints")
  assert len(steps) == 1  # one save, the same step on both processes
  text = (work / "logs-term" / "process-0.log").read_text()
  assert f"sft: SIGTERM: checkpoint saved at step {steps[0]} in" in text


@pytest.mark.slow
def test_bad_multihost_input_fails_in_one_line(work):
  # No coordinator and no other process: a one-line error within the timeout, not a hang.
  env = _env(JAX_COORDINATOR_ADDRESS="127.0.0.1:9", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="1",
             JAX_PLATFORMS="cpu", DISTFAIR_INIT_TIMEOUT="5")
  t0 = time.time()
  r = subprocess.run([sys.executable, "-m", "distfair_jax.cli", "train", "exp.yaml",
                      "run_dir=never"], cwd=work, env=env, capture_output=True, text=True,
                     timeout=120)
  assert r.returncode == 2 and time.time() - t0 < 90, r.stderr[-2000:]
  err = [l for l in r.stderr.splitlines() if l.startswith("distfair train: error:")]
  assert err and "expected the other processes and the coordinator to answer within 5 s" in err[0]
  # 3 processes (one device each) cannot split a batch of 8 rows: said before any step runs.
  r, logs = _rehearsal(3, ["train", "exp.yaml", "run_dir=three"], work, devices=1,
                       logs="logs-three")
  assert r.returncode == 2, logs[-3000:]
  assert "distfair train: error: sft: batch_size: expected a multiple of 3 (data x fsdp devices), " \
      "got 8" in logs
