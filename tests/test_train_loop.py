"""The training recipe end to end on a one-layer tiny model: resume after SIGKILL, SIGTERM, NaN,
LoRA (only adapters train; base and reference never change), and the hybrid stage learning."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from distfair_jax.config import load_config
from distfair_jax.train.loop import TrainingError, run_stage
from distfair_jax.train.preemption import SigtermFlag
from distfair_jax.train.stages import make_stage
from distfair_jax.train.trainer import _context, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMALL = """\
defaults: [{base}]
stages: [sft]
model:
  overrides: {{num_hidden_layers: 1, hidden_size: 64, intermediate_size: 128, num_attention_heads: 2,
              num_key_value_heads: 1, head_dim: 32}}
data:
  rows_per_occupation: 10
  max_length: 64
  max_prompt_length: 48
sft:
  epochs: 1
  batch_size: 8
  optim: {{learning_rate: 1.0e-3, warmup_steps: 2}}
hybrid:
  epochs: 1
  batch_size: 8
  optim: {{learning_rate: 1.0e-3, warmup_steps: 2}}
heldout:
  max_batches: 1
logging:
  tensorboard: false
  progress: false
"""


@pytest.fixture(scope="module")
def small_config(tmp_path_factory):
  d = tmp_path_factory.mktemp("cfg")
  path = d / "small.yaml"
  path.write_text(SMALL.format(base=os.path.join(ROOT, "configs", "base.yaml")), encoding="utf-8")
  # One tokenizer for every run of this module.
  from distfair_jax.data.tokenizer import build_tiny_tokenizer
  build_tiny_tokenizer(str(d / "tokenizer"))
  return str(path), str(d / "tokenizer")


def _env(cache_dir):
  env = dict(os.environ)
  env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", XLA_FLAGS="", JAX_PLATFORMS="cpu",
             PYTHONUNBUFFERED="1")
  return env


def _train_cmd(config, tokenizer, run_dir, *extra):
  return [sys.executable, "-m", "distfair_jax.cli", "train", config, f"run_dir={run_dir}",
          f"model.tokenizer={tokenizer}", "sft.epochs=3", "sft.max_steps=40", "checkpoint.every_steps=1",
          "checkpoint.async_save=false", *extra]


def _rows(run_dir, stage="sft"):
  with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
    return {r["step"]: r for r in map(json.loads, f) if r["stage"] == stage and r["split"] == "train"}


def _final_params(run_dir, stage="sft"):
  from distfair_jax.model import checkpoint_io
  return checkpoint_io.load_params(os.path.join(run_dir, stage, "final", "params"))


def _wait_for_checkpoint(proc, ckpt_dir, step, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if os.path.isdir(os.path.join(ckpt_dir, str(step))):
      return
    if proc.poll() is not None:
      raise AssertionError(f"training exited ({proc.returncode}) before checkpoint {step}: "
                           f"{proc.stderr.read()[-2000:]}")
    time.sleep(0.05)
  raise AssertionError(f"no checkpoint {step} after {timeout}s")


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted_run(small_config, tmp_path):
  config, tok = small_config
  env = _env(tmp_path / "jax_cache")
  full, killed = tmp_path / "full", tmp_path / "killed"
  subprocess.run(_train_cmd(config, tok, full), env=env, check=True, capture_output=True, timeout=600)

  proc = subprocess.Popen(_train_cmd(config, tok, killed), env=env, stderr=subprocess.PIPE,
                          stdout=subprocess.DEVNULL, text=True)
  _wait_for_checkpoint(proc, killed / "sft" / "checkpoints", 3)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not os.path.exists(killed / "sft" / "final"), "the run finished before it was killed"
  resumed = subprocess.run(_train_cmd(config, tok, killed), env=env, capture_output=True, text=True,
                           timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  match = [l for l in resumed.stderr.splitlines() if "resuming from step" in l]
  assert match, resumed.stderr[-2000:]
  resume_step = int(match[0].split("resuming from step")[1].split()[0])
  assert 3 <= resume_step < 40

  a, b = _final_params(full), _final_params(killed)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=0, atol=1e-7)
  rows_a, rows_b = _rows(full), _rows(killed)
  assert sorted(rows_b) == sorted(rows_a) == list(range(1, 41))  # 3 epochs hold > 40 steps
  for step in range(resume_step + 1, 41):
    for key in ("loss", "grad_norm", "learning_rate"):
      assert rows_a[step][key] == pytest.approx(rows_b[step][key], rel=1e-6, abs=1e-7), (step, key)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(small_config, tmp_path):
  config, tok = small_config
  run = tmp_path / "term"
  proc = subprocess.Popen(_train_cmd(config, tok, run, "checkpoint.every_steps=0"),
                          env=_env(tmp_path / "jax_cache"), stderr=subprocess.PIPE,
                          stdout=subprocess.DEVNULL, text=True)
  # every_steps=0: no periodic checkpoints, so any checkpoint is the SIGTERM one.
  deadline = time.time() + 300
  while not os.path.exists(run / "metrics.jsonl") and time.time() < deadline and proc.poll() is None:
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 143, err[-2000:]
  assert "SIGTERM: checkpoint saved at step" in err
  steps = [int(s) for s in os.listdir(run / "sft" / "checkpoints") if s.isdigit()]
  assert len(steps) == 1 and 1 <= steps[0] < 40
  assert not os.path.exists(run / "sft" / "final")


@pytest.mark.slow
def test_a_second_train_in_a_busy_run_directory_is_refused(small_config, tmp_path):
  """Two `distfair train` on one run directory: the second is refused in one line naming the
  first, which goes on and writes every metrics row once."""
  import socket
  config, tok = small_config
  env = _env(tmp_path / "jax_cache")
  run = tmp_path / "busy"
  cmd = _train_cmd(config, tok, run, "sft.max_steps=12", "checkpoint.every_steps=4")
  first = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                           text=True)
  deadline = time.time() + 300
  while not os.path.exists(run / "lock.json"):
    assert first.poll() is None, first.stderr.read()[-2000:]
    assert time.time() < deadline, "no lock after 300 s"
    time.sleep(0.01)
  first.send_signal(signal.SIGSTOP)  # holding the lock, however fast the second one starts
  try:
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
  finally:
    first.send_signal(signal.SIGCONT)
  assert second.returncode == 2, second.stderr[-2000:]
  assert second.stderr.count("\n") == 1 and "Traceback" not in second.stderr, second.stderr
  assert (f"distfair train: error: {run / 'lock.json'}: run_dir: expected no other run in this "
          f"directory, got process {first.pid} on {socket.gethostname()} since ") in second.stderr
  _, err = first.communicate(timeout=600)
  assert first.returncode == 0, err[-2000:]
  with open(run / "metrics.jsonl", encoding="utf-8") as f:
    keys = [(r["stage"], r["split"], r["step"]) for r in map(json.loads, f)]
  assert len(keys) == len(set(keys))  # every row once
  assert sorted(_rows(run)) == list(range(1, 13))
  assert not os.path.exists(run / "lock.json")  # released at the end


def _config(config, tok, run_dir, *overrides):
  return load_config(config, [f"run_dir={run_dir}", f"model.tokenizer={tok}", *overrides])


def test_nan_loss_stops_and_keeps_last_good_checkpoint(small_config, tmp_path):
  config, tok = small_config
  cfg = _config(config, tok, tmp_path / "nan", "sft.optim.optimizer=sgd", "sft.optim.b1=0.0",
                "sft.optim.learning_rate=1e30", "sft.optim.clip_norm=0", "sft.optim.warmup_steps=0",
                "checkpoint.every_steps=1", "checkpoint.async_save=false", "sft.max_steps=6")
  with pytest.raises(TrainingError, match=r"sft: non-finite loss .* at step (\d+); stopped without "
                                          r"saving this state; the last good checkpoint is step"):
    train(cfg)
  steps = sorted(int(s) for s in os.listdir(tmp_path / "nan" / "sft" / "checkpoints") if s.isdigit())
  rows = _rows(tmp_path / "nan")
  assert steps and all(np.isfinite(rows[s]["loss"]) for s in steps)
  assert not os.path.exists(tmp_path / "nan" / "sft" / "final")


def _truncate_largest_file(directory, size=100):
  files = [os.path.join(d, f) for d, _, fs in os.walk(directory) for f in fs]
  biggest = max(files, key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.truncate(size)


def test_a_corrupted_latest_checkpoint_resumes_from_the_older_one(small_config, tmp_path, capsys):
  import shutil
  from distfair_jax.errors import InputError
  config, tok = small_config
  opts = ("sft.max_steps=6", "checkpoint.every_steps=2", "checkpoint.keep=3",
          "checkpoint.async_save=false")
  full = tmp_path / "full"
  train(_config(config, tok, full, *opts))
  # A run killed after its step-6 checkpoint, whose latest checkpoint a full disk cut short.
  bad = tmp_path / "bad"
  shutil.copytree(full, bad)
  shutil.rmtree(bad / "sft" / "final")
  ckpts = bad / "sft" / "checkpoints"
  _truncate_largest_file(ckpts / "6")
  capsys.readouterr()
  train(_config(config, tok, bad, *opts))
  err = capsys.readouterr().err
  assert f"{ckpts / '6'}: checkpoint unreadable (" in err and "); trying step 4\n" in err, err
  assert (f"{ckpts / '6'}: moved to {bad / 'sft' / 'unreadable_checkpoints' / '6'} (unreadable; "
          f"resuming from an older checkpoint)\n") in err
  assert "sft: resuming from step 4 of 6" in err and "Traceback" not in err
  assert os.listdir(bad / "sft" / "unreadable_checkpoints") == ["6"]  # kept, named, not deleted
  assert sorted(int(s) for s in os.listdir(ckpts)) == [2, 4, 6]  # step 6 saved again
  rows_full, rows_bad = _rows(full), _rows(bad)
  assert sorted(rows_bad) == sorted(rows_full) == list(range(1, 7))
  for step in range(1, 7):
    assert rows_bad[step]["loss"] == pytest.approx(rows_full[step]["loss"], rel=1e-6, abs=1e-7)
  for x, y in zip(jax.tree.leaves(_final_params(full)), jax.tree.leaves(_final_params(bad))):
    np.testing.assert_allclose(x, y, rtol=0, atol=1e-7)

  # No readable checkpoint at all: one line naming them, nothing moved; the stage starts over
  # only when the user moves them aside.
  worse = tmp_path / "worse"
  shutil.copytree(full, worse)
  shutil.rmtree(worse / "sft" / "final")
  for step in (2, 4, 6):
    with open(worse / "sft" / "checkpoints" / str(step) / "state" / "_METADATA", "r+b") as f:
      f.truncate(10)
  with pytest.raises(InputError, match=r"sft/checkpoints: checkpoints: expected one readable "
                                       r"checkpoint to resume from, got none \(steps 6, 4, 2, all "
                                       r"unreadable\); to start the stage over, move .* aside"):
    train(_config(config, tok, worse, *opts))
  assert sorted(int(s) for s in os.listdir(worse / "sft" / "checkpoints")) == [2, 4, 6]
  assert not os.path.exists(worse / "sft" / "unreadable_checkpoints")
  assert not os.path.exists(worse / "lock.json")  # released on the error too


def _numpy(tree):
  return [np.array(x) for x in jax.tree.leaves(tree)]


def test_lora_trains_adapters_only_and_keeps_base_and_reference(small_config, tmp_path):
  config, tok = small_config
  cfg = _config(config, tok, tmp_path / "lora", "lora.enabled=true", "lora.rank=4",
                "stages=[sft,hybrid]", "sft.max_steps=3", "hybrid.max_steps=3",
                "sft.optim.learning_rate=1e-2", "hybrid.optim.learning_rate=1e-2")
  ctx = _context(cfg, None)
  base = ctx.model.params
  paths = {"/".join(map(str, p)) for p, _ in jax.tree_util.tree_flatten_with_path(
      nnx.to_pure_dict(base))[0]}
  assert paths and all("lora_" in p for p in paths)  # trainable = adapters only
  frozen_before = _numpy(ctx.model.frozen)
  lora_b_before = [x for p, x in jax.tree_util.tree_flatten_with_path(
      jax.device_get(nnx.to_pure_dict(base)))[0] if "lora_b" in str(p)]
  assert all(np.all(x == 0) for x in lora_b_before)
  with SigtermFlag() as flag:
    sft_params, ctx.rngs, _ = run_stage(ctx, make_stage("sft", cfg), base, flag)
    sft_copy = _numpy(sft_params)
    hybrid_params, ctx.rngs, summary = run_stage(ctx, make_stage("hybrid", cfg), sft_params, flag)
  # base weights untouched in both stages; the reference (= stage-1 result) untouched by stage 2
  for a, b in zip(frozen_before, _numpy(ctx.model.frozen)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(sft_copy, _numpy(sft_params)):
    np.testing.assert_array_equal(a, b)
  moved = [not np.array_equal(a, b) for a, b in zip(sft_copy, _numpy(hybrid_params))]
  assert any(moved)
  lora_b_after = [x for p, x in jax.tree_util.tree_flatten_with_path(
      jax.device_get(nnx.to_pure_dict(sft_params)))[0] if "lora_b" in str(p)]
  assert any(np.any(x != 0) for x in lora_b_after)
  assert np.isfinite(summary["train"]["loss"])
  # merging folds the adapters into the base kernels and restores the plain layout
  merged = ctx.model.with_params(hybrid_params).merged()
  assert not any("lora" in "/".join(map(str, p)) for p, _ in
                 jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(merged)))[0])


@pytest.mark.slow
def test_hybrid_learns_skewed_target_and_binds_tokens(small_config, tmp_path):
  config, tok = small_config
  from distfair_jax.data import build_dataset
  records = build_dataset("gender_real_us", rows_per_occupation=20, test_rounds=0, seed=0).records
  # A skewed 0.8 / 0.2 target for every occupation.
  for kind in records:
    for r in records[kind]:
      r["target"] = [0.8, 0.2]
  cfg = _config(config, tok, tmp_path / "learn", "stages=[hybrid]", "hybrid.epochs=3",
                "hybrid.max_steps=60", "hybrid.optim.learning_rate=3e-3", "hybrid.beta=0.5",
                "hybrid.renormalize=true", "hybrid.layout=packed", "mesh.data=4", "mesh.tensor=-1")
  assert make_stage("hybrid", cfg).layout(4) == "packed"  # one row per pair, 4 pairs over 4 devices
  train(cfg, records=records)
  rows = _rows(tmp_path / "learn", "hybrid")
  steps = sorted(rows)
  first = np.mean([rows[s]["steering_kl"] for s in steps[:3]])
  last = np.mean([rows[s]["steering_kl"] for s in steps[-5:]])
  assert last < 0.25 * first and last < 0.05, (first, last)
  margin = np.mean([rows[s]["rewards/margins"] for s in steps[-5:]])
  assert margin > 0, margin
  assert np.mean([rows[s]["rewards/chosen"] for s in steps[-5:]]) > \
      np.mean([rows[s]["rewards/rejected"] for s in steps[-5:]])


def test_a_run_directory_refuses_another_config_once_a_stage_has_started(tmp_path):
  from distfair_jax.errors import InputError
  from distfair_jax.train.rundir import RunDir
  run = RunDir(tmp_path / "r")
  a = load_config(None, [f"run_dir={tmp_path / 'r'}", "sft.epochs=1"])
  b = load_config(None, [f"run_dir={tmp_path / 'r'}", "sft.epochs=2"])
  run.claim(a)
  run.claim(b)  # nothing started yet: the new config simply replaces the old one
  assert run.read_config().sft.epochs == 2
  run.claim(load_config(None, [f"run_dir={tmp_path / 'moved'}", "sft.epochs=2",
                               "logging.every_steps=7", "eval.rounds=3"]))  # no result changes
  (run.checkpoints_dir("sft") / "1").mkdir(parents=True)  # the sft stage has started
  with pytest.raises(InputError, match=r"config\.yaml: this run directory holds a run with a "
                                       r"different config \(differs in sft\.epochs; stages "
                                       r"started: sft\)"):
    run.claim(a)


def test_eval_of_a_stage_the_run_has_not_finished_names_the_stages(tmp_path, capsys):
  from distfair_jax import fileio
  from distfair_jax.cli import main
  from distfair_jax.train.rundir import RunDir
  run = RunDir(tmp_path / "r")
  run.claim(load_config(None, [f"run_dir={tmp_path / 'r'}"]))
  fileio.write_json(run.final_dir("sft") / "summary.json", {"stage": "sft", "steps": 1})
  assert main(["eval", str(tmp_path / "r"), "--stage", "dpo", "rounds=1"]) == 2
  err = capsys.readouterr().err
  assert err == (f"distfair eval: error: {tmp_path / 'r'}: stage: expected one of the finished "
                 f"stages (sft), got 'dpo'\n")


def test_heldout_evaluation_compiles_once(small_config, tmp_path):
  """Held-out evaluation during a stage: every call reuses one compiled program."""
  from distfair_jax.train.heldout import HeldoutEval
  config, tok = small_config
  cfg = _config(config, tok, tmp_path / "h", "stages=[hybrid]", "hybrid.reference=cached",
                "heldout.max_batches=2", "data.heldout_fraction=0.3")
  ctx = _context(cfg, None)
  stage = make_stage("hybrid", cfg)
  m = ctx.model
  held = HeldoutEval(stage, ctx.heldout_records["kto"], model=m, encoder=ctx.encoder,
                     mesh=ctx.mesh, loss_fn=stage.loss_fn(m.graphdef, m.graphdef_eval,
                                                          ctx.steering_ids),
                     steering_ids=ctx.steering_ids, max_batches=2, packing_pays=True)
  first = held(m.params, m.rngs, m.params)
  second = held(m.params, m.rngs, m.params)
  assert first == second and np.isfinite(first["loss"]) and 0 <= first["steering_mae"] <= 1
  assert held._eval._cache_size() == 1 and held._ref._cache_size() == 1  # noqa: SLF001
