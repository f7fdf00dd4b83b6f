"""Progress lines on stderr, from JAX process 0 only (every host of a pod runs the same program)."""

from __future__ import annotations

import sys

__all__ = ["log", "is_main_process"]


def is_main_process() -> bool:
  import jax
  return jax.process_index() == 0


def log(msg: str) -> None:
  """One line on stderr, from process 0."""
  if is_main_process():
    print(msg, file=sys.stderr, flush=True)
