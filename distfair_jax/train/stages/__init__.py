"""The training stages, one module each: ``sft`` (and the ``ift`` baseline), ``hybrid`` (the
method), ``dpo`` (the baseline). ``make_stage(name, cfg)`` builds one from a run's config.

``STAGE_CLASSES`` is the one registry of stages: a new stage is its module, one entry here and its
name in ``config.Stage``, the typed choice a config's ``stages`` list is checked against (config
sits below train, so it cannot read this registry; each class names itself by that enum member, and
the registry must cover the enum, checked on import). Everything else is read from the class
(``section``, ``records_kind``, ...): ``SECTIONS`` (stage -> its config section) is what
``config.results_affecting`` compares."""

from __future__ import annotations

from distfair_jax.config import Config, Stage
from distfair_jax.errors import InputError
from distfair_jax.losses import DEFAULT_TILE_SIZE
from distfair_jax.train.stages.common import StageBase
from distfair_jax.train.stages.dpo import DPOStage
from distfair_jax.train.stages.hybrid import HybridStage
from distfair_jax.train.stages.sft import IFTStage, SFTStage

__all__ = ["StageBase", "SFTStage", "IFTStage", "HybridStage", "DPOStage", "make_stage", "STAGES",
           "STAGE_CLASSES", "SECTIONS"]

STAGE_CLASSES: dict[str, type[StageBase]] = {
    cls.name: cls for cls in (SFTStage, HybridStage, IFTStage, DPOStage)}
STAGES = tuple(s.value for s in Stage)
if set(STAGE_CLASSES) != set(STAGES):
  raise TypeError(f"train.stages: expected one stage class per config.Stage {list(STAGES)}, got "
                  f"{list(STAGE_CLASSES)}")
SECTIONS = {name: cls.section for name, cls in STAGE_CLASSES.items()}


def make_stage(name: str, cfg: Config, tile_size: int = DEFAULT_TILE_SIZE) -> StageBase:
  """The stage ``name`` of a run: sft and ift read ``cfg.sft``, hybrid ``cfg.hybrid``, dpo
  ``cfg.dpo``."""
  cls = STAGE_CLASSES.get(name)
  if cls is None:
    raise InputError(f"stage: expected one of {', '.join(STAGES)}, got {name!r}")
  return cls(getattr(cfg, cls.section), tile_size)
