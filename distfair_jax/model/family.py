"""The model family: which module class builds a config's model.

    model = family.build(config, rngs=nnx.Rngs(0))     # Llama for llama / qwen2, Gemma2 for gemma2

Every place that builds a model from a config (the loader, the converter, presets) goes through
``build``, so a new architecture is one entry here plus its config fields.
"""

from __future__ import annotations

from flax import nnx

from distfair_jax.model.gemma2 import Gemma2
from distfair_jax.model.llama import Llama, LlamaConfig

__all__ = ["MODEL_CLASSES", "model_class", "build"]

MODEL_CLASSES: dict[str, type[Llama]] = {"llama": Llama, "qwen2": Llama, "gemma2": Gemma2}


def model_class(config: LlamaConfig) -> type[Llama]:
  """The module class of ``config``'s model type."""
  return MODEL_CLASSES[config.model_type]


def build(config: LlamaConfig, *, rngs: nnx.Rngs) -> Llama:
  """The model of ``config`` (random weights from ``rngs``)."""
  return model_class(config)(config, rngs=rngs)
