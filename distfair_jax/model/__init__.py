"""The Flax NNX Llama family (Llama, Qwen2, Gemma 2) and named presets."""

from __future__ import annotations

from distfair_jax.model.family import build, model_class
from distfair_jax.model.gemma2 import Gemma2
from distfair_jax.model.llama import (
    KVCache,
    Llama,
    LlamaConfig,
    SharedPrefixCache,
    apply_rope,
    positions_from_mask,
    rope_inv_freq,
)
from distfair_jax.model.presets import (
    PRESETS,
    ParamStats,
    abstract_state,
    get_preset,
    param_stats,
    preset_names,
)

__all__ = [
    "Gemma2", "build", "model_class", "KVCache", "Llama", "LlamaConfig", "SharedPrefixCache", "apply_rope",
    "positions_from_mask", "rope_inv_freq",
    "PRESETS", "ParamStats", "abstract_state", "get_preset", "param_stats", "preset_names",
]
