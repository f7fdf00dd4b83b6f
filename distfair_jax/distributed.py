"""Multi-host start-up: ``jax.distributed.initialize`` when the launch scripts ask for it.

- ``JAX_COORDINATOR_ADDRESS`` (host:port), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` set (GPU hosts,
  ``launch/gpu/run.sh``, or any cluster scheduler): initialise with them.
- ``DISTFAIR_DISTRIBUTED=1`` (set by ``launch/tpu/run.sh`` on every worker of a TPU VM slice):
  ``jax.distributed.initialize()`` with no arguments; JAX reads the slice's topology itself.
- Otherwise: a single process, nothing to do.

Must run before anything touches a JAX device.
"""

from __future__ import annotations

import os

from distfair_jax.errors import InputError

__all__ = ["maybe_initialize"]


def maybe_initialize() -> bool:
  """Initialises the JAX distributed runtime when the environment asks for it; returns whether it did."""
  import jax
  address = os.environ.get("JAX_COORDINATOR_ADDRESS")
  if address:
    try:
      num = int(os.environ["JAX_NUM_PROCESSES"])
      pid = int(os.environ["JAX_PROCESS_ID"])
    except (KeyError, ValueError):
      raise InputError("environment: JAX_NUM_PROCESSES / JAX_PROCESS_ID: expected integers next to "
                       f"JAX_COORDINATOR_ADDRESS={address}") from None
    jax.distributed.initialize(address, num, pid)
    return True
  if os.environ.get("DISTFAIR_DISTRIBUTED") == "1":
    jax.distributed.initialize()
    return True
  return False
