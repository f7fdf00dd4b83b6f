"""The training stages, one module each: ``sft`` (and the ``ift`` baseline), ``hybrid`` (the
method), ``dpo`` (the baseline). ``make_stage(name, cfg)`` builds one from a run's config."""

from __future__ import annotations

from distfair_jax.config import Config
from distfair_jax.errors import InputError
from distfair_jax.losses import DEFAULT_TILE_SIZE
from distfair_jax.train.stages.common import StageBase
from distfair_jax.train.stages.dpo import DPOStage
from distfair_jax.train.stages.hybrid import HybridStage
from distfair_jax.train.stages.sft import IFTStage, SFTStage

__all__ = ["StageBase", "SFTStage", "IFTStage", "HybridStage", "DPOStage", "make_stage", "STAGES"]

STAGES = ("sft", "hybrid", "ift", "dpo")


def make_stage(name: str, cfg: Config, tile_size: int = DEFAULT_TILE_SIZE) -> StageBase:
  """The stage ``name`` of a run: sft and ift read ``cfg.sft``, hybrid ``cfg.hybrid``, dpo
  ``cfg.dpo``."""
  if name in ("sft", "ift"):
    return (IFTStage if name == "ift" else SFTStage)(cfg.sft, tile_size)
  if name == "hybrid":
    return HybridStage(cfg.hybrid, tile_size)
  if name == "dpo":
    return DPOStage(cfg.dpo, tile_size)
  raise InputError(f"stage: expected one of {', '.join(STAGES)}, got {name!r}")
