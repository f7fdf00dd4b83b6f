"""Stage 1, SFT (the desirable records, steering token first), and the IFT baseline (the same loss
on records without steering tokens).

Loss: ``losses.sft_loss`` on the labelled completion tokens (steering token, answer, end of turn):
the mean over sequences of each one's mean token log-likelihood, negated (``sft.average: token``:
the mean over all tokens). FLOPs: 3 forwards over the batch's tokens.
"""

from __future__ import annotations

import dataclasses
from distfair_jax import losses as L
from distfair_jax.config import SFTConfig, Stage
from distfair_jax.data import batches as B
from distfair_jax.train import flops as flops_lib
from distfair_jax.train.stages.common import (StageBase, merge, rng_state, sequence_logps,
                                              token_count)

__all__ = ["SFTStage", "IFTStage"]


@dataclasses.dataclass(frozen=True)
class SFTStage(StageBase, name=Stage.sft, section="sft", records_kind="sft", seed_offset=1,
               steered=True, batch_types=(B.SFTBatch,)):
  """``sft``: the desirable records, steering token first."""
  cfg: SFTConfig = SFTConfig()

  def loss_fn(self, graphdef, graphdef_eval, steering_ids):
    tile, average = self.tile_size, self.cfg.average

    def sft_loss(params, rngs, frozen, ref_params, batch: B.SFTBatch):
      model = merge(graphdef, params, rngs, frozen)
      _, _, tok, _ = sequence_logps(model, batch.seq, tile)
      loss = L.sft_loss(tok, batch.seq.label_mask, average=str(average))
      metrics = {"loss": loss, "tokens": token_count(batch.seq)}
      return loss, (metrics, rng_state(model))

    return sft_loss

  def flops(self, model_cfg, batch: B.SFTBatch, processes: int = 1) -> float:
    rows, length = batch.seq.input_ids.shape
    return 3 * flops_lib.sequence_flops(model_cfg, rows * processes, length)

  def abstract_batch(self, length: int, num_categories: int, layout: str) -> B.SFTBatch:
    return B.SFTBatch.abstract(self.cfg.batch_size, length, num_categories)


@dataclasses.dataclass(frozen=True)
class IFTStage(SFTStage, name=Stage.ift, records_kind="ift", steered=False):
  """``ift``, the IFT baseline: the same loss on records without steering tokens (``cfg.sft``)."""
