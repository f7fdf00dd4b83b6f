"""Preemption: SIGTERM (a TPU VM slice being taken back) asks the stage loop to save and stop.

``SigtermFlag`` sets a flag on SIGTERM (the previous handler is restored on exit); the loop checks it
at each step boundary, saves a checkpoint and raises ``Preempted``, which exits with code 143.
"""

from __future__ import annotations

import signal

__all__ = ["SigtermFlag", "Preempted", "PREEMPTED_EXIT_CODE"]

PREEMPTED_EXIT_CODE = 143


class Preempted(SystemExit):
  """Raised after SIGTERM once the checkpoint is saved; exits the process with code 143."""

  def __init__(self, message: str):
    super().__init__(PREEMPTED_EXIT_CODE)
    self.message = message


class SigtermFlag:
  """A context manager whose ``requested`` turns True on SIGTERM."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: preemption handling is the caller's job
      self._previous = None
    return self

  def _handle(self, signum, frame):
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    return False
