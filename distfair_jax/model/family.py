"""The model family: which module class builds a config's model, and which function reads its
family's own Hugging Face config fields.

    model = family.build(config, rngs=nnx.Rngs(0))     # Llama for llama / qwen2, Gemma2 for gemma2

Every place that builds a model from a config (the loader, the converter, presets) goes through
``build``, so a new architecture is its module file, one entry in each table here, and its
architecture name in ``llama_config.ARCHITECTURES``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from flax import nnx

from distfair_jax.model import gemma2, gemma3, llama_config, qwen3
from distfair_jax.model.gemma2 import Gemma2
from distfair_jax.model.gemma3 import Gemma3
from distfair_jax.model.llama import Llama
from distfair_jax.model.llama_config import LlamaConfig
from distfair_jax.model.qwen3 import Qwen3

__all__ = ["MODEL_CLASSES", "HF_FIELDS", "model_class", "hf_fields", "build"]

MODEL_CLASSES: dict[str, type[Llama]] = {"llama": Llama, "qwen2": Llama, "gemma2": Gemma2,
                                         "qwen3": Qwen3, "gemma3": Gemma3}

# model type -> fields(hf_config_dict, get, source) -> LlamaConfig keyword arguments: the family's
# checks and fields beyond the shared ones, each in its family's own file. ``LlamaConfig.from_hf``
# reads this one table (``llama_config.HF_FIELDS``, filled here; ``distfair_jax.model`` imports this
# module first, so it is full before any config is read).
HF_FIELDS: dict[str, Callable[[Mapping[str, Any], Callable[..., Any], str], dict[str, Any]]] = (
    llama_config.HF_FIELDS)
HF_FIELDS.update({"gemma2": gemma2.hf_fields, "qwen3": qwen3.hf_fields,
                  "gemma3": gemma3.hf_fields})


def model_class(config: LlamaConfig) -> type[Llama]:
  """The module class of ``config``'s model type."""
  return MODEL_CLASSES[config.model_type]


def hf_fields(model_type: str):
  """The function that reads ``model_type``'s own Hugging Face config fields."""
  return HF_FIELDS[model_type]


def build(config: LlamaConfig, *, rngs: nnx.Rngs) -> Llama:
  """The model of ``config`` (random weights from ``rngs``)."""
  return model_class(config)(config, rngs=rngs)
