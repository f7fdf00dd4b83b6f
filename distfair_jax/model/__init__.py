"""The Flax NNX Llama family (Llama, Qwen2, Gemma 2, Qwen3, Gemma 3) and named presets."""

from __future__ import annotations

from distfair_jax.model.family import build, model_class
from distfair_jax.model.gemma2 import Gemma2
from distfair_jax.model.gemma3 import Gemma3
from distfair_jax.model.cache import KVCache, SharedPrefixCache
from distfair_jax.model.layers import apply_rope, positions_from_mask, rope_inv_freq
from distfair_jax.model.llama import Llama
from distfair_jax.model.llama_config import LlamaConfig
from distfair_jax.model.presets import (
    PRESETS,
    ParamStats,
    abstract_state,
    get_preset,
    param_stats,
    preset_names,
)
from distfair_jax.model.qwen3 import Qwen3

__all__ = [
    "Gemma2", "Gemma3", "Qwen3", "build", "model_class", "KVCache", "Llama", "LlamaConfig",
    "SharedPrefixCache", "apply_rope", "positions_from_mask", "rope_inv_freq",
    "PRESETS", "ParamStats", "abstract_state", "get_preset", "param_stats", "preset_names",
]
