"""Held-out evaluation during training: the stage's loss metrics (and, for stages that train steering
tokens, the exact steering MAE) on the records held out of training, compiled once per stage.

The records are split by prompt (``split_heldout``), so a prompt is never both trained on and
evaluated. Batches are at most the stage's batch size (fewer when fewer records are held out), in
the layout the stage picks for that size, one pass, seed 0; at most ``heldout.max_batches`` of them.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from distfair_jax import losses as L
from distfair_jax import sharding as shd
from distfair_jax.data import kinds, pipeline
from distfair_jax.train.step import make_eval_fn

__all__ = ["split_heldout", "HeldoutEval"]


def split_heldout(records: list[dict], fraction: float, *, seed: int) -> tuple[list[dict], list[dict]]:
  """Split records by prompt text: a ``fraction`` of the distinct prompts (seeded) is held out, so
  a prompt is never both trained on and evaluated (KTO pairs share a prompt and stay together)."""
  if fraction <= 0 or not records:
    return list(records), []
  prompts = sorted({r["prompt"] for r in records})
  rng = np.random.default_rng(seed)
  n_out = max(1, int(round(len(prompts) * fraction))) if len(prompts) > 1 else 0
  held = set(rng.permutation(len(prompts))[:n_out].tolist())
  held_prompts = {prompts[i] for i in held}
  train = [r for r in records if r["prompt"] not in held_prompts]
  heldout = [r for r in records if r["prompt"] in held_prompts]
  return train, heldout


class HeldoutEval:
  """``evaluate(params, rngs, ref_params)`` -> mean held-out metrics of a stage (``{}`` when too
  few records are held out for one batch). The evaluation function and, for a cached reference,
  the reference function are jit-compiled once, when the evaluator is built."""

  def __init__(self, stage, records: Sequence[dict], *, model, encoder, mesh, loss_fn: Callable,
               steering_ids, max_batches: int, packing_pays: bool):
    self.stage, self.mesh, self.model = stage, mesh, model
    self.max_batches = max_batches
    devices = mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
    self.pipe = self._pipeline(list(records), encoder, devices, packing_pays)
    replicated = NamedSharding(mesh, PartitionSpec())  # every process reads the metrics
    self._eval = jax.jit(make_eval_fn(loss_fn, model.graphdef_eval,
                                      steering_ids if stage.steered else None),
                         out_shardings=replicated)
    self._ref = (jax.jit(stage.reference_fn(model.graphdef_eval)) if stage.caches_reference
                 else None)

  def _pipeline(self, records, encoder, devices: int, packing_pays: bool):
    pair = kinds.get(self.stage.records_kind).records_per_unit
    bs = min(self.stage.cfg.batch_size, len(records) - len(records) % pair)
    if bs < pair:
      return None
    layout = self.stage.layout(devices, packing_pays, batch_size=bs)
    multiple = self.stage.batch_multiple(layout, devices)
    bs = (bs // multiple) * multiple
    if bs < pair:
      return None
    layout = self.stage.layout(devices, packing_pays, batch_size=bs)
    return pipeline.make_batches(records, encoder, self.stage.records_kind, bs, seed=0,
                                 num_epochs=1, layout=layout, **self.stage.batch_options())

  def __call__(self, params, rngs, ref_params) -> dict[str, float]:
    if self.pipe is None:
      return {}
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    batches = self.pipe.iterator()
    frozen = self.model.frozen
    ref = ref_params if self.stage.needs_reference else None
    for _ in range(min(self.pipe.num_steps, self.max_batches)):
      batch = shd.put_batch(next(batches), self.mesh)
      if self._ref is not None:
        batch = batch.replace(reference=self._ref(ref_params, rngs, frozen, batch))
      out = jax.device_get(self._eval(params, rngs, frozen, ref, batch))
      for k, v in L.drop_absent_classes(out).items():  # class means over batches that have it
        v = np.asarray(v, np.float64)
        sums[k] = sums.get(k, 0.0) + float(v.sum() if v.ndim else v)
        counts[k] = counts.get(k, 0) + (v.size if v.ndim else 1)
    return {k: sums[k] / counts[k] for k in sums if k != "tokens"}

