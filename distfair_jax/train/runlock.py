"""The run directory's lock: one ``distfair train`` at a time in a run directory.

Process 0 of a run holds ``<run_dir>/lock.json`` for the run's life: the holder's host, process id,
start time and a heartbeat (rewritten every ``HEARTBEAT_S`` seconds), and a random token naming
this hold. A second run in the same directory (a second terminal, a relaunched job, a babysitting
script restarting a run that is still alive) is refused in one line naming the holder. What a
holder left behind:

- a process of this host that is gone (SIGKILL, a crash, a reboot): its lock is taken over, saying
  so;
- a process of this host that is alive: refused, ``--force`` or not (stop it first);
- another host's process (a bucket run directory shared by machines): its liveness cannot be
  seen from here; refused with the age of its heartbeat, and ``--force`` takes it over;
- an unreadable lock file: refused; ``--force`` takes it over.

Paths go through ``etils.epath`` (``fileio``), so a ``gs://`` run directory is locked too. A local
lock is created atomically (a complete file hard-linked into place, which fails if one exists); an
object store has no exclusive create through epath, so there the lock is written and read back,
which leaves a window of one round trip between two runs started at the same instant. A holder
whose lock was taken over (``--force``) stops its heartbeat, says so, and leaves the new lock alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any, Callable, Iterator

from distfair_jax import fileio
from distfair_jax.errors import InputError

__all__ = ["LOCK", "HEARTBEAT_S", "Holder", "RunLock", "hold", "decide"]

LOCK = "lock.json"
HEARTBEAT_S = 60.0


def _utc(t: float) -> str:
  return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def _ago(seconds: float) -> str:
  seconds = max(0, int(seconds))
  if seconds < 120:
    return f"{seconds} s"
  return f"{seconds // 60} min" if seconds < 7200 else f"{seconds // 3600} h"


@dataclasses.dataclass(frozen=True)
class Holder:
  """Who holds a run directory's lock."""
  host: str
  pid: int
  since: float
  heartbeat: float
  token: str

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self)) + "\n"

  @classmethod
  def from_json(cls, text: str) -> "Holder | None":
    """The holder a lock file names; None if the text is not a lock."""
    try:
      d = json.loads(text)
      return cls(host=str(d["host"]), pid=int(d["pid"]), since=float(d["since"]),
                 heartbeat=float(d["heartbeat"]), token=str(d["token"]))
    except (ValueError, TypeError, KeyError):
      return None

  def describe(self, now: float) -> str:
    return (f"process {self.pid} on {self.host} since {_utc(self.since)} (last heartbeat "
            f"{_ago(now - self.heartbeat)} ago)")


def decide(holder: Holder | None, *, host: str, pid: int, alive: Callable[[int], bool],
           force: bool) -> tuple[str, str]:
  """What to do with an existing lock -> (``take`` | ``refuse``, why). ``holder``: the lock's
  holder, None for an unreadable lock file."""
  if holder is None:
    return ("take", "an unreadable lock file (--force)") if force else \
        ("refuse", "an unreadable lock file; if no run uses this directory, rerun with --force")
  if holder.host == host:
    if holder.pid == pid:
      return "take", "this process's own earlier lock"
    if not alive(holder.pid):
      return "take", f"the lock of process {holder.pid} on {host}, which is gone"
    return "refuse", "it is running on this host: wait for it to finish or stop it"
  if force:
    return "take", f"the lock of process {holder.pid} on {holder.host} (--force)"
  return "refuse", ("another host's run: if it is gone (its heartbeat stopped), rerun with "
                    "--force")


def _alive(pid: int) -> bool:
  return fileio._alive(pid)  # noqa: SLF001 - the same test as the leftovers' sweep


class RunLock:
  """The lock of one run directory (``acquire`` / ``release``; a heartbeat thread in between)."""

  def __init__(self, run_dir: Any, *, force: bool = False, heartbeat_s: float = HEARTBEAT_S,
               say: Callable[[str], None] | None = None):
    self.dir = fileio.as_path(run_dir)
    self.path = self.dir / LOCK
    self.force = force
    self.heartbeat_s = heartbeat_s
    self.host = socket.gethostname()
    self.token = uuid.uuid4().hex
    self.since = time.time()
    self.lost: Holder | None = None  # who took the lock over (--force elsewhere)
    self._say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def _holder(self, heartbeat: float) -> Holder:
    return Holder(self.host, os.getpid(), self.since, heartbeat, self.token)

  def read(self) -> tuple[bool, Holder | None]:
    """-> (the lock file exists, its holder or None if unreadable)."""
    try:
      text = self.path.read_text()
    except FileNotFoundError:
      return False, None
    except (OSError, UnicodeDecodeError):
      return True, None
    return True, Holder.from_json(text)

  # -- writing ------------------------------------------------------------------------------------

  def _create(self) -> bool:
    """Writes this hold's lock where none exists; whether it did."""
    text = self._holder(time.time()).to_json()
    if fileio.is_remote(self.path):
      if self.path.exists():
        return False
      self.path.write_text(text)
      holder = self.read()[1]  # the last writer wins: is it this run?
      return holder is not None and holder.token == self.token
    tmp = self.dir / fileio.temporary_name(LOCK)
    tmp.write_text(text)
    try:
      os.link(tmp, self.path)  # atomic, and fails if a lock exists
      return True
    except FileExistsError:
      return False
    finally:
      tmp.unlink(missing_ok=True)

  def _remove_stale(self, stale: Holder | None) -> None:
    """Removes the lock judged stale, unless another run replaced it meanwhile."""
    if fileio.is_remote(self.path):
      self.path.unlink(missing_ok=True)
      return
    moved = self.dir / fileio.temporary_name(LOCK)
    try:
      os.rename(self.path, moved)
    except FileNotFoundError:
      return  # another run removed it first
    # A fresh lock (another run took over first): put it back.
    if Holder.from_json(moved.read_bytes().decode("utf-8", "replace")) != stale:
      with contextlib.suppress(FileExistsError):
        os.link(moved, self.path)
    moved.unlink(missing_ok=True)

  def _write_heartbeat(self) -> None:
    text = self._holder(time.time()).to_json()
    if fileio.is_remote(self.path):
      self.path.write_text(text)
      return
    tmp = self.dir / fileio.temporary_name(LOCK)
    tmp.write_text(text)
    os.replace(tmp, self.path)

  # -- the hold -----------------------------------------------------------------------------------

  def acquire(self) -> None:
    """Holds the lock, taking over a stale one (saying so); InputError in one line naming the
    holder otherwise."""
    fileio.make_dirs(self.dir)
    for _ in range(5):
      if self._create():
        self._start_heartbeat()
        return
      exists, holder = self.read()
      if not exists:
        continue  # released meanwhile
      action, why = decide(holder, host=self.host, pid=os.getpid(), alive=_alive,
                           force=self.force)
      if action == "refuse":
        who = holder.describe(time.time()) if holder else "an unknown run"
        raise InputError(f"{self.path}: run_dir: expected no other run in this directory, got "
                         f"{who}: {why}")
      self._say(f"{self.path}: taking over {why}" + (
          f" (held since {_utc(holder.since)})" if holder else ""))
      self._remove_stale(holder)
    raise InputError(f"{self.path}: run_dir: expected to take the lock, got other runs taking "
                     f"it at the same time (5 tries)")

  def _start_heartbeat(self) -> None:
    self._stop.clear()
    self._thread = threading.Thread(target=self._beat, name="run-dir-lock", daemon=True)
    self._thread.start()

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      try:
        if not self.still_held():
          return
        self._write_heartbeat()
      except OSError as e:  # a transient storage error: the next beat tries again
        self._say(f"{self.path}: lock heartbeat not written ({e})")

  def still_held(self) -> bool:
    """Whether the lock file is still this hold's; says once when another run took it."""
    _, holder = self.read()
    if holder is not None and holder.token == self.token:
      return True
    if self.lost is None:
      self.lost = holder or Holder("?", -1, 0.0, 0.0, "")
      self._say(f"{self.path}: the lock was taken over by "
                f"{holder.describe(time.time()) if holder else 'an unknown run'}; this run no "
                f"longer holds the run directory")
    return False

  def release(self) -> None:
    """Stops the heartbeat and removes the lock if it is still this hold's."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    _, holder = self.read()
    if holder is not None and holder.token == self.token:
      self.path.unlink(missing_ok=True)


@contextlib.contextmanager
def hold(run_dir: Any, *, force: bool = False, heartbeat_s: float = HEARTBEAT_S
         ) -> Iterator[RunLock | None]:
  """Holds ``run_dir``'s lock on process 0 for the block (every process calls this: a refusal on
  process 0 is an InputError on every process). Yields the lock (None on other processes)."""
  import jax  # pylint: disable=g-import-not-at-top
  from distfair_jax import distributed  # pylint: disable=g-import-not-at-top
  lock = RunLock(run_dir, force=force, heartbeat_s=heartbeat_s) if jax.process_index() == 0 \
      else None
  error = None
  if lock is not None:
    try:
      lock.acquire()
    except InputError as e:
      error = e
  if distributed.any_process(error is not None):
    raise error or InputError(f"{fileio.as_path(run_dir) / LOCK}: run_dir: expected no other run "
                              f"in this directory, got one (process 0 names it)")
  try:
    yield lock
  finally:
    if lock is not None:
      lock.release()
