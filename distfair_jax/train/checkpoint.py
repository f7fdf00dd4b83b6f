"""Checkpoints of a training stage, with orbax's ``CheckpointManager``.

Each checkpoint ``<stage dir>/checkpoints/<step>/`` holds three items:

- ``state``: the ``TrainState`` (step, trainable params, optimizer state, dropout RNG state), saved
  with the arrays' shardings (every host writes its own shards) and restored onto the shardings of an
  abstract target;
- ``data``: the data iterator's state (JSON), so a resumed run sees exactly the batches an
  uninterrupted one would;
- ``config``: the resolved run config (JSON), for the record.

orbax writes each step into a temporary directory and renames it once complete, so a run killed in the
middle of a save leaves the previous checkpoint as the latest complete one. Saves are asynchronous
(training goes on while the arrays are written) and ``wait()`` / ``close()`` block until they are on
disk. Paths may be local or ``gs://`` buckets (orbax resolves them through etils.epath).
"""

from __future__ import annotations

from typing import Any

import jax
import orbax.checkpoint as ocp

from distfair_jax import fileio

__all__ = ["StageCheckpointer"]


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
    self._manager = ocp.CheckpointManager(fileio.as_path(directory), options=options,
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

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree) -> Any:
  """ShapeDtypeStructs (with shardings) of a tree of arrays: the restore target for ``tree``."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
