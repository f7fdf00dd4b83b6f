"""Checkpoints of a training stage, with orbax's ``CheckpointManager``.

Each checkpoint ``<stage dir>/checkpoints/<step>/`` holds three items:

- ``state``: the ``TrainState`` (step, trainable params, optimizer state, dropout RNG state), saved
  with the arrays' shardings (every host writes its own shards) and restored onto the shardings of an
  abstract target;
- ``data``: the data iterator's state (JSON), so a resumed run sees exactly the batches an
  uninterrupted one would;
- ``config``: the resolved run config (JSON), for the record.

orbax writes each step into a temporary directory and renames it once complete, so a run killed in the
middle of a save leaves the previous checkpoint as the latest complete one. A complete checkpoint can
still be unreadable (a disk that filled, a copy cut short): ``restore_latest`` tries the newest
first and falls back to the next older kept one, saying so, and moves the unreadable ones newer than
the one it resumes from to ``<stage dir>/unreadable_checkpoints/<step>`` (never deleted). With none
readable it moves nothing and raises a one-line ``InputError`` naming them. Saves are asynchronous
(training goes on while the arrays are written) and ``wait()`` / ``close()`` block until they are on
disk. Paths may be local or ``gs://`` buckets (orbax resolves them through etils.epath).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from distfair_jax import distributed
from distfair_jax import fileio
from distfair_jax.errors import InputError

__all__ = ["StageCheckpointer", "UNREADABLE"]

UNREADABLE = "unreadable_checkpoints"  # next to a stage's checkpoints/: those set aside


def _first_line(e: BaseException | None) -> str:
  if e is None:
    return "unreadable on another process"
  for _ in range(8):  # the root cause says what was wrong with the bytes
    cause = e.__cause__ or e.__context__
    if cause is None:
      break
    e = cause
  text = " ".join(str(e).split())
  return f"{type(e).__name__}: {text[:160]}{'...' if len(text) > 160 else ''}"


def _move(src, dst) -> None:
  """Moves a directory (a local rename; a bucket has none: copied, then removed)."""
  if fileio.is_remote(src):
    fileio.copy_tree(src, dst)
    src.rmtree()
  else:
    fileio.make_dirs(dst.parent)
    src.rename(dst)


class StageCheckpointer:
  """Keep-N, every-K-steps checkpoints of one stage."""

  def __init__(self, directory, *, keep: int = 2, every_steps: int = 0, async_save: bool = True):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max(1, keep),
        save_interval_steps=1,  # the loop decides when to save (should_save / end of stage / SIGTERM)
        enable_async_checkpointing=async_save,
        create=True,
    )
    self.every_steps = every_steps
    self.directory = fileio.as_path(directory)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "data", "config"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def should_save(self, step: int) -> bool:
    return self.every_steps > 0 and step % self.every_steps == 0

  def save(self, step: int, state, data_state: dict, config: dict) -> bool:
    """Saves unless a checkpoint of this step exists; returns whether a save started."""
    if step in self._manager.all_steps():
      return False
    return bool(self._manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                data=ocp.args.JsonSave(data_state),
                                config=ocp.args.JsonSave(config)),
        force=True))

  def restore(self, step: int, abstract_state) -> tuple[Any, dict]:
    """-> (state placed per abstract_state's shardings, data iterator state)."""
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                data=ocp.args.JsonRestore()))
    return restored.state, restored.data

  def restore_latest(self, abstract_state, say: Callable[[str], None] = print
                     ) -> tuple[int, Any, dict] | None:
    """-> (step, state, data iterator state) of the newest readable checkpoint, None if there is
    none. An unreadable one is named (``say``, one line) and the next older one tried; those newer
    than the one restored are moved to ``UNREADABLE``. InputError if none can be read. Every
    process calls this: a checkpoint unreadable on any process is unreadable."""
    steps = sorted(self._manager.all_steps(), reverse=True)
    bad: list[tuple[int, str]] = []
    for i, step in enumerate(steps):
      error = None
      try:
        state, data = self.restore(step, abstract_state)
      except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise what the bytes make
        error = e
      if not distributed.any_process(error is not None):
        if bad:
          self._set_aside([s for s, _ in bad], say)
        return step, state, data
      bad.append((step, _first_line(error)))
      nxt = f"trying step {steps[i + 1]}" if i + 1 < len(steps) else "no older checkpoint left"
      say(f"{self.directory / str(step)}: checkpoint unreadable ({bad[-1][1]}); {nxt}")
    if not bad:
      return None
    raise InputError(f"{self.directory}: checkpoints: expected one readable checkpoint to resume "
                     f"from, got none (steps {', '.join(str(s) for s, _ in bad)}, all unreadable); "
                     f"to start the stage over, move {self.directory} aside and rerun")

  def _set_aside(self, steps: list[int], say: Callable[[str], None]) -> None:
    """Moves unreadable step directories to ``UNREADABLE`` (process 0) and rereads the steps."""
    aside = self.directory.parent / UNREADABLE
    if jax.process_index() == 0:
      for step in steps:
        dst = aside / str(step)
        n = 1
        while dst.exists():  # the same step set aside before
          n += 1
          dst = aside / f"{step}-{n}"
        _move(self.directory / str(step), dst)
        say(f"{self.directory / str(step)}: moved to {dst} (unreadable; resuming from an older "
            f"checkpoint)")
    distributed.barrier("checkpoints-set-aside")
    self._manager.reload()

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree) -> Any:
  """ShapeDtypeStructs (with shardings) of a tree of arrays: the restore target for ``tree``."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
