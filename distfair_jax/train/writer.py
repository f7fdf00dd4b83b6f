"""Metrics output of a run: one JSON line per logged step and TensorBoard event files.

``metrics.jsonl`` rows: ``{"stage": ..., "step": ..., "split": "train" | "eval", <name>: value, ...}``
with the names KTO users know (``loss``, ``kl``, ``steering_kl``, ``rewards/chosen``, ...). TensorBoard
scalars are tagged ``<stage>/<split>/<name>``.
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping

from distfair_jax import fileio

__all__ = ["MetricsWriter"]


def _scalar(v) -> float:
  try:
    return float(v)
  except (TypeError, ValueError):
    return float("nan")


class MetricsWriter:
  """Appends to ``<run_dir>/metrics.jsonl`` and, optionally, ``<run_dir>/tensorboard``."""

  def __init__(self, run_dir: Any, *, tensorboard: bool = True, enabled: bool = True):
    self.enabled = enabled
    self.path = fileio.as_path(run_dir) / "metrics.jsonl"
    self._tb = None
    if enabled and tensorboard:
      from tensorboardX import SummaryWriter  # lazy: only runs that log need it
      self._tb = SummaryWriter(str(fileio.as_path(run_dir) / "tensorboard"), flush_secs=30)

  def write(self, stage: str, step: int, metrics: Mapping[str, float], split: str = "train") -> None:
    if not self.enabled:
      return
    row = {"stage": stage, "step": int(step), "split": split}
    row.update({k: _scalar(v) for k, v in metrics.items()})
    with self.path.open("a", encoding="utf-8") as f:
      f.write(json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                          for k, v in row.items()}) + "\n")
    if self._tb is not None:
      for k, v in metrics.items():
        self._tb.add_scalar(f"{stage}/{split}/{k}", _scalar(v), int(step))

  def truncate_after(self, stage: str, step: int) -> None:
    """Drop rows of ``stage`` logged after ``step`` (a resumed run logs those steps again)."""
    if not self.enabled or not self.path.exists():
      return
    rows = [r for _, r in fileio.read_jsonl(self.path)]
    fileio.write_text(self.path, "".join(
        json.dumps(r) + "\n" for r in rows
        if not (r.get("stage") == stage and r.get("step", 0) > step)))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
