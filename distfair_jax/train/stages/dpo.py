"""The DPO baseline (started from the IFT model; the reference is the IFT model).

Policy and reference forwards over the chosen and rejected sequences, ``losses.dpo_loss`` (IPO and
conservative DPO as options; IPO on per-token averaged log-probs, as its paper, TRL and HALOs). Layout rule (``dpo.layout: auto``): packed, one row per record,
[prompt | chosen | rejected], the prompt computed once for both (one row per record either way, so
never more tokens than the rows layout).
"""

from __future__ import annotations

import dataclasses
import jax
import jax.numpy as jnp

from distfair_jax import losses as L
from distfair_jax.config import DPOConfig, Layout, Stage
from distfair_jax.data import batches as B
from distfair_jax.train import flops as flops_lib
from distfair_jax.train.stages.common import (StageBase, merge, packed_group_logps,
                                              packed_token_count, rng_state, sequence_logps,
                                              token_count)
from distfair_jax.train.stages.hybrid import _concat

__all__ = ["DPOStage"]


@dataclasses.dataclass(frozen=True)
class DPOStage(StageBase, name=Stage.dpo, section="dpo", records_kind="dpo", seed_offset=3,
               needs_reference=True, batch_types=(B.DPOBatch, B.PackedDPOBatch)):
  cfg: DPOConfig = DPOConfig()

  def layout(self, devices: int, packing_pays: bool = True, batch_size: int | None = None) -> str:
    return "rows" if self.cfg.layout == Layout.rows else "packed"

  def loss_fn(self, graphdef, graphdef_eval, steering_ids):
    tile, c = self.tile_size, self.cfg

    def logps_of(model, batch):
      """-> sequence log-probs [2B]: chosen..., rejected..."""
      if isinstance(batch, B.PackedDPOBatch):  # one row per record: [prompt | chosen | rejected]
        lp = packed_group_logps(model, batch.packed, tile)[2]
        return jnp.concatenate([lp[:, 0, 0], lp[:, 0, 1]])
      return sequence_logps(model, _concat(batch.chosen, batch.rejected), tile)[3]

    def label_counts(batch):
      """-> completion tokens per sequence [2B] (chosen..., rejected...), at least 1."""
      if isinstance(batch, B.PackedDPOBatch):
        branch = batch.packed.label_branch[:, 0]  # [R, N]: 0 chosen, 1 rejected, -1 padding
        counts = jnp.concatenate([jnp.sum(branch == 0, -1), jnp.sum(branch == 1, -1)])
      else:
        counts = jnp.concatenate([jnp.sum(batch.chosen.label_mask, -1),
                                  jnp.sum(batch.rejected.label_mask, -1)])
      return jnp.maximum(counts.astype(jnp.float32), 1.0)

    def dpo_loss(params, rngs, frozen, ref_params, batch):
      policy = merge(graphdef, params, rngs, frozen)
      ref = merge(graphdef_eval, ref_params, rngs, frozen)
      logps = logps_of(policy, batch)
      ref_logps = jax.lax.stop_gradient(logps_of(ref, batch))
      if c.ipo:  # IPO takes per-token averaged log-probs (Azar et al.; TRL and HALOs alike)
        counts = label_counts(batch)
        logps, ref_logps = logps / counts, ref_logps / counts
      if isinstance(batch, B.PackedDPOBatch):
        b, tokens = batch.packed.input_ids.shape[0], packed_token_count(batch.packed, 2)
      else:
        b, tokens = batch.chosen.input_ids.shape[0], token_count(batch.chosen, batch.rejected)
      loss, metrics = L.dpo_loss(logps[:b], logps[b:], ref_logps[:b], ref_logps[b:], beta=c.beta,
                                 label_smoothing=c.label_smoothing, ipo=c.ipo)
      metrics = {**metrics, "loss": loss, "tokens": tokens}
      return loss, (metrics, rng_state(policy))

    return dpo_loss

  def flops(self, model_cfg, batch, processes: int = 1) -> float:
    if isinstance(batch, B.PackedDPOBatch):
      p = batch.packed
      rows, length = p.input_ids.shape
      r, g, n = p.label_ids.shape
      both = sum(flops_lib.packed_flops(model_cfg, rows * processes, length, r * g * processes, n))
    else:
      f = lambda s: flops_lib.sequence_flops(model_cfg, s.input_ids.shape[0] * processes,
                                             s.input_ids.shape[1])
      both = f(batch.chosen) + f(batch.rejected)
    return 3 * both + both

  def abstract_batch(self, length: int, num_categories: int, layout: str):
    b = self.cfg.batch_size
    if layout == "packed":
      return B.PackedDPOBatch.abstract(b, length, num_categories)
    return B.DPOBatch.abstract(b, length, num_categories)
