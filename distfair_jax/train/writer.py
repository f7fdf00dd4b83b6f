"""Metrics output of a run: one JSON line per logged step and TensorBoard event files.

``metrics.jsonl`` rows: ``{"stage": ..., "step": ..., "split": "train" | "eval", <name>: value, ...}``
with the names KTO users know (``loss``, ``kl``, ``steering_kl``, ``rewards/chosen``, ...). TensorBoard
scalars are tagged ``<stage>/<split>/<name>``.

A local run directory gets each row appended as it is logged. An object store (``gs://...``) cannot
append: the rows are kept and the whole file rewritten on ``flush()`` (the loop flushes before every
checkpoint, so the metrics of every checkpointed step are in the bucket when it is), at least every
``flush_secs``, and on ``close()``; TensorBoard events are written to a local directory and copied
into the bucket at the same points (tensorboardX's own GCS writer is broken).
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from typing import Any, Mapping

from distfair_jax import fileio

__all__ = ["MetricsWriter"]


def _scalar(v) -> float:
  try:
    return float(v)
  except (TypeError, ValueError):
    return float("nan")


def _line(row: Mapping[str, Any]) -> str:
  return json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                     for k, v in row.items()}) + "\n"


class MetricsWriter:
  """Writes ``<run_dir>/metrics.jsonl`` and, optionally, ``<run_dir>/tensorboard``."""

  def __init__(self, run_dir: Any, *, tensorboard: bool = True, enabled: bool = True,
               flush_secs: float = 60.0):
    self.enabled = enabled
    root = fileio.as_path(run_dir)
    self.path = root / "metrics.jsonl"
    self.remote = fileio.is_remote(root)
    self._tb_dir = root / "tensorboard"
    self._rows: list[str] | None = None
    self._flushed = time.monotonic()
    self.flush_secs = flush_secs
    self._tb = self._staging = None
    if enabled and self.remote:
      self._rows = ([_line(r) for _, r in fileio.read_jsonl(self.path)]
                    if self.path.exists() else [])
    if enabled and tensorboard:
      from tensorboardX import SummaryWriter  # lazy: only runs that log need it
      if self.remote:
        self._staging = tempfile.TemporaryDirectory(prefix="distfair-tensorboard-")
        logdir = self._staging.name
      else:
        logdir = str(self._tb_dir)
      self._tb = SummaryWriter(logdir, flush_secs=30)

  def write(self, stage: str, step: int, metrics: Mapping[str, float], split: str = "train") -> None:
    if not self.enabled:
      return
    row = {"stage": stage, "step": int(step), "split": split}
    row.update({k: _scalar(v) for k, v in metrics.items()})
    if self.remote:
      self._rows.append(_line(row))
      if time.monotonic() - self._flushed > self.flush_secs:
        self.flush()
    else:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      with self.path.open("a", encoding="utf-8") as f:
        f.write(_line(row))
    if self._tb is not None:
      for k, v in metrics.items():
        self._tb.add_scalar(f"{stage}/{split}/{k}", _scalar(v), int(step))

  def truncate_after(self, stage: str, step: int) -> None:
    """Drop rows of ``stage`` logged after ``step`` (a resumed run logs those steps again)."""
    if not self.enabled:
      return
    keep = lambda line: not ((r := json.loads(line)).get("stage") == stage and
                             r.get("step", 0) > step)
    if self.remote:
      self._rows = [line for line in self._rows if keep(line)]
      self.flush()
    elif self.path.exists():
      rows = [json.dumps(r) + "\n" for _, r in fileio.read_jsonl(self.path)]
      fileio.write_text(self.path, "".join(line for line in rows if keep(line)))

  def flush(self) -> None:
    """Makes everything written so far durable in the run directory."""
    if not self.enabled:
      return
    if self._tb is not None:
      self._tb.flush()
    if self.remote:
      fileio.write_text(self.path, "".join(self._rows))
      if self._staging is not None:
        fileio.copy_tree(self._staging.name, self._tb_dir)
      self._flushed = time.monotonic()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    self.flush()
    if self._staging is not None:
      self._staging.cleanup()
      self._staging = None
