"""Faults a long run meets: a run directory that cannot be one, a busy run directory (the lock),
a corrupted latest checkpoint."""

from __future__ import annotations

import os

import pytest

from distfair_jax import fileio
from distfair_jax.cli import main
from distfair_jax.errors import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, "configs", "base.yaml")


# ------------------------------------------------------------------------------------------------
# A run_dir that cannot be one


@pytest.fixture
def no_model(monkeypatch):
  """Building the model fails the test: a bad run_dir must be refused before it."""
  from distfair_jax.train import trainer

  def refuse(*args, **kwargs):
    raise AssertionError("the model was built")
  monkeypatch.setattr(trainer, "load_model", refuse)
  monkeypatch.setattr(trainer.build_lib, "training_records", refuse)


def _train_error(capsys, run_dir) -> str:
  assert main(["train", BASE, f"run_dir={run_dir}"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "Traceback" not in err, err
  return err


def test_a_run_dir_that_is_a_file(tmp_path, capsys, no_model):
  f = tmp_path / "hostname"
  f.write_text("x\n")
  err = _train_error(capsys, f)
  assert f"{f}: run_dir: expected a directory, got a file" in err
  assert f.read_text() == "x\n"


def test_a_run_dir_under_a_file(tmp_path, capsys, no_model):
  f = tmp_path / "hostname"
  f.write_text("x\n")
  err = _train_error(capsys, f / "runs" / "x")
  assert f"{f / 'runs' / 'x'}: run_dir: expected a directory, got a path under the file {f}" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory")
def test_a_read_only_run_dir(tmp_path, capsys, no_model):
  d = tmp_path / "ro"
  d.mkdir()
  d.chmod(0o555)
  try:
    err = _train_error(capsys, d / "run")
  finally:
    d.chmod(0o755)
  assert f"{d / 'run'}: run_dir: expected a directory this user can write, got Permission " \
         f"denied" in err


def test_a_run_dir_that_cannot_be_written(tmp_path, capsys, monkeypatch, no_model):
  # The same path as a read-only directory, for a test run as root (which writes anywhere).
  def denied(d):
    raise PermissionError(13, "Permission denied", str(d))
  monkeypatch.setattr(fileio, "_probe_write", denied)
  err = _train_error(capsys, tmp_path / "run")
  assert f"{tmp_path / 'run'}: run_dir: expected a directory this user can write, got " \
         f"Permission denied ({tmp_path / 'run'})" in err


def test_writable_dir_creates_and_accepts_a_directory(tmp_path):
  d = fileio.writable_dir(tmp_path / "a" / "b")
  assert d.is_dir() and list(d.iterdir()) == []  # the probe leaves nothing behind
  assert fileio.writable_dir(d) == d
  with pytest.raises(InputError, match=r"out: expected a directory, got a file"):
    (tmp_path / "f").write_text("")
    fileio.writable_dir(tmp_path / "f", "out")


# ------------------------------------------------------------------------------------------------
# The run directory's lock

import json  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from distfair_jax.train import runlock  # noqa: E402
from distfair_jax.train.runlock import Holder, RunLock, decide  # noqa: E402

HOST = socket.gethostname()


def _holder(host=HOST, pid=12345, token="t0"):
  return Holder(host, pid, 1_700_000_000.0, time.time() - 30, token)


@pytest.mark.parametrize("holder, alive, force, action, why", [
    (_holder(), True, False, "refuse", "running on this host: wait for it to finish or stop it"),
    (_holder(), True, True, "refuse", "running on this host"),  # --force never for a live one
    (_holder(), False, False, "take", f"the lock of process 12345 on {HOST}, which is gone"),
    (_holder(host="tpu-vm-7"), True, False, "refuse", "another host's run: if it is gone"),
    (_holder(host="tpu-vm-7"), True, True, "take", "the lock of process 12345 on tpu-vm-7 "
                                                   "(--force)"),
    (None, True, False, "refuse", "an unreadable lock file; if no run uses this directory"),
    (None, True, True, "take", "an unreadable lock file (--force)"),
    (_holder(pid=777), True, False, "take", "this process's own earlier lock"),
])
def test_what_a_lock_left_by_another_run_means(holder, alive, force, action, why):
  got, text = decide(holder, host=HOST, pid=777, alive=lambda pid: alive, force=force)
  assert got == action and why in text


def _write_lock(run_dir, holder):
  run_dir.mkdir(parents=True, exist_ok=True)
  (run_dir / runlock.LOCK).write_text(holder.to_json())


def test_a_lock_names_its_holder_and_goes_with_the_run(tmp_path):
  lock = RunLock(tmp_path / "r")
  lock.acquire()
  data = json.loads((tmp_path / "r" / runlock.LOCK).read_text())
  assert (data["host"], data["pid"]) == (HOST, os.getpid())
  assert data["since"] <= data["heartbeat"] <= time.time() and data["token"] == lock.token
  lock.release()
  assert not (tmp_path / "r" / runlock.LOCK).exists()


def test_a_live_holder_refuses_a_second_run_in_one_line(tmp_path):
  sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    _write_lock(tmp_path / "r", _holder(pid=sleeper.pid))
    with pytest.raises(InputError) as e:
      RunLock(tmp_path / "r", force=True).acquire()
    assert str(e.value) == (
        f"{tmp_path / 'r' / runlock.LOCK}: run_dir: expected no other run in this directory, got "
        f"process {sleeper.pid} on {HOST} since 2023-11-14 22:13:20 UTC (last heartbeat 30 s "
        f"ago): it is running on this host: wait for it to finish or stop it")
  finally:
    sleeper.kill()
    sleeper.wait()
  # the same lock, its process gone: taken over, saying so
  said = []
  lock = RunLock(tmp_path / "r", say=said.append)
  lock.acquire()
  assert said == [f"{tmp_path / 'r' / runlock.LOCK}: taking over the lock of process "
                  f"{sleeper.pid} on {HOST}, which is gone (held since 2023-11-14 22:13:20 UTC)"]
  assert Holder.from_json((tmp_path / "r" / runlock.LOCK).read_text()).token == lock.token
  lock.release()


def test_another_hosts_lock_needs_force(tmp_path):
  _write_lock(tmp_path / "r", _holder(host="tpu-vm-7"))
  with pytest.raises(InputError, match=r"got process 12345 on tpu-vm-7 since .*: another host's "
                                       r"run: if it is gone \(its heartbeat stopped\), rerun with "
                                       r"--force$"):
    RunLock(tmp_path / "r").acquire()
  said = []
  lock = RunLock(tmp_path / "r", force=True, say=said.append)
  lock.acquire()
  assert "taking over the lock of process 12345 on tpu-vm-7 (--force)" in said[0]
  lock.release()
  (tmp_path / "r" / runlock.LOCK).write_text("{not json")
  with pytest.raises(InputError, match=r"got an unknown run: an unreadable lock file"):
    RunLock(tmp_path / "r").acquire()
  lock = RunLock(tmp_path / "r", force=True, say=said.append)
  lock.acquire()
  lock.release()


def test_the_heartbeat_beats_and_a_lock_taken_over_is_left_alone(tmp_path):
  said = []
  lock = RunLock(tmp_path / "r", heartbeat_s=0.02, say=said.append)
  lock.acquire()
  first = Holder.from_json((tmp_path / "r" / runlock.LOCK).read_text()).heartbeat
  deadline = time.time() + 10
  while Holder.from_json((tmp_path / "r" / runlock.LOCK).read_text()).heartbeat == first:
    assert time.time() < deadline, "no heartbeat"
    time.sleep(0.01)
  other = _holder(host="tpu-vm-7", token="theirs")
  lock._stop.set()  # noqa: SLF001 - the heartbeat paused, as another host forces the lock
  lock._thread.join()  # noqa: SLF001
  _write_lock(tmp_path / "r", other)
  assert not lock.still_held()
  assert said[-1].endswith("this run no longer holds the run directory") and "tpu-vm-7" in said[-1]
  lock.release()
  assert Holder.from_json((tmp_path / "r" / runlock.LOCK).read_text()) == other


RACER = """
import os, sys, time
from distfair_jax.errors import InputError
from distfair_jax.train.runlock import RunLock
run_dir, go = sys.argv[1], sys.argv[2]
while not os.path.exists(go):
  time.sleep(0.001)
lock = RunLock(run_dir)
try:
  lock.acquire()
except InputError as e:
  print("refused", e, flush=True)
  sys.exit(2)
print("held", flush=True)
time.sleep(3)
lock.release()
"""


def test_runs_started_at_the_same_instant_one_holds_the_rest_are_refused(tmp_path):
  go = tmp_path / "go"
  procs = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path / "r"), str(go)],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT) for _ in range(4)]
  time.sleep(2)  # every racer imported and waiting
  go.write_text("")
  outs = [p.communicate(timeout=60)[0] for p in procs]
  assert sorted(p.returncode for p in procs) == [0, 2, 2, 2], outs
  holder = next(p.pid for p, o in zip(procs, outs) if o.startswith("held"))
  for out in outs:
    if out.startswith("refused"):
      assert f"got process {holder} on {HOST}" in out and out.count("\n") == 1
  assert not (tmp_path / "r" / runlock.LOCK).exists()
