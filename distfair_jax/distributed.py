"""Multi-host: start-up of the JAX distributed runtime, and the few collectives the host program needs.

Every host of a pod slice (or every process of ``launch/local/multihost.sh``) runs the same program.
``maybe_initialize`` starts ``jax.distributed`` when the environment asks for it:

- ``JAX_COORDINATOR_ADDRESS`` (host:port), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` set (GPU hosts,
  ``launch/gpu/run.sh``, ``launch/local/multihost.sh``, a cluster scheduler): initialise with them.
- ``DISTFAIR_DISTRIBUTED=1`` (set by ``launch/tpu/run.sh`` on every worker of a TPU VM slice):
  ``jax.distributed.initialize()`` with no arguments; JAX reads the slice's topology itself.
- Otherwise: a single process, nothing to do.

A coordinator that never answers is an ``InputError`` after ``DISTFAIR_INIT_TIMEOUT`` seconds (default
120), not a hang. The host-side collectives (``any_process``, ``gather``) are no-ops in one process.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

from distfair_jax.errors import InputError

__all__ = ["maybe_initialize", "any_process", "gather", "barrier"]

_TIMEOUT_VAR = "DISTFAIR_INIT_TIMEOUT"


def _timeout() -> int:
  raw = os.environ.get(_TIMEOUT_VAR, "120")
  try:
    value = int(raw)
  except ValueError:
    value = 0
  if value < 1:
    raise InputError(f"environment: {_TIMEOUT_VAR}: expected a positive number of seconds, "
                     f"got {raw!r}")
  return value


def maybe_initialize(name: str = "distfair") -> bool:
  """Initialises the JAX distributed runtime when the environment asks for it; returns whether it did.
  Must run before anything touches a JAX device. ``name`` prefixes the error line of a start-up
  that times out (e.g. ``distfair train``)."""
  import jax
  address = os.environ.get("JAX_COORDINATOR_ADDRESS")
  if address:
    try:
      num = int(os.environ["JAX_NUM_PROCESSES"])
      pid = int(os.environ["JAX_PROCESS_ID"])
    except (KeyError, ValueError):
      raise InputError("environment: JAX_NUM_PROCESSES / JAX_PROCESS_ID: expected integers next to "
                       f"JAX_COORDINATOR_ADDRESS={address}") from None
    if not 0 <= pid < num:
      raise InputError(f"environment: JAX_PROCESS_ID: expected 0..{num - 1} for "
                       f"JAX_NUM_PROCESSES={num}, got {pid}")
    _initialize(jax, name, f"JAX_COORDINATOR_ADDRESS={address}", coordinator_address=address,
                num_processes=num, process_id=pid)
    return True
  if os.environ.get("DISTFAIR_DISTRIBUTED") == "1":
    _initialize(jax, name, "DISTFAIR_DISTRIBUTED=1")
    return True
  return False


def _initialize(jax, name: str, where: str, **kwargs) -> None:
  """``jax.distributed.initialize`` under a watchdog: the runtime aborts the process (a C++ fatal
  error and a stack trace) when the coordinator or another process never answers; the watchdog
  says so in one line and exits with code 2 first."""
  timeout = _timeout()
  message = (f"{name}: error: environment: {where}: expected the other processes and the "
             f"coordinator to answer within {timeout} s ({_TIMEOUT_VAR}), got no answer (is every "
             f"process started, with the same JAX_NUM_PROCESSES?)")
  done = threading.Event()

  def watchdog():
    if not done.wait(timeout):
      print(message, file=sys.stderr, flush=True)
      os._exit(2)

  threading.Thread(target=watchdog, daemon=True).start()
  try:
    jax.distributed.initialize(initialization_timeout=timeout + 60, **kwargs)
  except Exception as e:  # noqa: BLE001 - the runtime raises assorted XLA errors
    first = " ".join(str(e).split())[:200]
    raise InputError(f"environment: {where}: expected a distributed runtime to start, got "
                     f"{type(e).__name__}: {first}") from None
  finally:
    done.set()


def any_process(flag: bool) -> bool:
  """Whether ``flag`` is true on any process (every process must call this at the same point)."""
  import jax
  if jax.process_count() == 1:
    return bool(flag)
  import numpy as np
  from jax.experimental import multihost_utils
  return bool(np.asarray(multihost_utils.process_allgather(np.asarray([flag], np.int32))).any())


def main_says(flag: bool) -> bool:
  """The first process's ``flag``, on every process (every process must call this at the same
  point): a choice only the first process can make, e.g. from files only it reads."""
  import jax
  if jax.process_count() == 1:
    return bool(flag)
  import numpy as np
  from jax.experimental import multihost_utils
  return bool(np.asarray(multihost_utils.broadcast_one_to_all(np.asarray([flag], np.int32)))[0])


def gather(tree: Any) -> Any:
  """A tree of (possibly sharded, multi-process) jax arrays -> the same tree of host numpy arrays,
  whole, on every process."""
  import jax
  import numpy as np
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, jax.device_get(tree))
  from jax.experimental import multihost_utils
  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def barrier(name: str) -> None:
  """Every process waits here until all have reached it."""
  import jax
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
