"""The Flax NNX Llama family and named presets."""

from __future__ import annotations

from distfair_jax.model.llama import (
    KVCache,
    Llama,
    LlamaConfig,
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
    "KVCache", "Llama", "LlamaConfig", "apply_rope", "positions_from_mask", "rope_inv_freq",
    "PRESETS", "ParamStats", "abstract_state", "get_preset", "param_stats", "preset_names",
]
