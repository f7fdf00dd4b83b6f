"""Named model configs: ``tiny`` (the built-in default) and the shapes of common checkpoints
(Llama 3.x, Qwen2.5, Gemma 2, Qwen3, Gemma 3).

``param_stats(config, mesh)`` counts parameters and per-device bytes from ``nnx.eval_shape``: no
weights are allocated, so it works for an 8B model on a laptop and for a mesh given as sizes only.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx

from distfair_jax import sharding as shd
from distfair_jax.errors import InputError
from distfair_jax.model import family
from distfair_jax.model.llama import LlamaConfig

_LLAMA3_ROPE_1B = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
_LLAMA3_ROPE_8B = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

# What each family's checkpoints share (Hugging Face config fields).
_LLAMA3 = dict(vocab_size=128256, num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
               rope_theta=500000.0, max_position_embeddings=131072, architecture="LlamaForCausalLM",
               bos_token_id=128000, eos_token_id=128001)
_QWEN25 = dict(head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768,
               attention_bias=True, architecture="Qwen2ForCausalLM", bos_token_id=151643,
               eos_token_id=151645)

# Gemma 2 (gemma-2-2b / gemma-2-9b config.json): GeGLU, soft-capped attention (50) and output (30)
# logits, sliding-window (4096) layers alternating with global ones, tied embeddings.
_GEMMA2 = dict(vocab_size=256000, head_dim=256, rms_norm_eps=1e-6, rope_theta=10000.0,
               max_position_embeddings=8192, tie_word_embeddings=True,
               architecture="Gemma2ForCausalLM", hidden_act="gelu_pytorch_tanh",
               query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
               final_logit_softcapping=30.0, sliding_window=4096, bos_token_id=2, eos_token_id=1,
               pad_token_id=0)

# Qwen3 (Qwen3-0.6B / Qwen3-8B config.json): no attention biases, QK-norm, head_dim 128
# whatever the hidden size.
_QWEN3 = dict(vocab_size=151936, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0,
              max_position_embeddings=40960, architecture="Qwen3ForCausalLM",
              bos_token_id=151643, eos_token_id=151645)

# Gemma 3 (gemma-3-270m / gemma-3-1b-pt config.json, the 4B's text_config): QK-norm, five
# sliding-window layers to one global, RoPE base 10000 on the sliding layers and 1e6 on the global
# ones, no soft-capping, tied embeddings.
_GEMMA3 = dict(vocab_size=262144, head_dim=256, rms_norm_eps=1e-6, rope_theta=1000000.0,
               rope_local_base_freq=10000.0, max_position_embeddings=32768,
               tie_word_embeddings=True, architecture="Gemma3ForCausalLM",
               hidden_act="gelu_pytorch_tanh", query_pre_attn_scalar=256, sliding_window=512,
               bos_token_id=2, eos_token_id=1, pad_token_id=0)

PRESETS: dict[str, dict[str, Any]] = {
    # Built-in default: ~1M parameters, so the whole demo (a base model, seven methods, a learning
    # rate grid, multi-round evaluation) runs in minutes on two CPU cores; vocabulary of the tiny
    # tokenizer. Untied: with tied embeddings a model this small learns the steering digits' output
    # rows by inflating their input embeddings, and then cannot read which digit it wrote.
    "tiny": dict(
        vocab_size=2048, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-5,
        rope_theta=10000.0, max_position_embeddings=2048, tie_word_embeddings=False,
        architecture="LlamaForCausalLM"),
    "llama3.2-1b": dict(
        _LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, head_dim=64,
        rope_scaling=_LLAMA3_ROPE_1B, tie_word_embeddings=True),
    "llama3.1-8b": dict(
        _LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, head_dim=128,
        rope_scaling=_LLAMA3_ROPE_8B, tie_word_embeddings=False),
    "qwen2.5-1.5b": dict(
        _QWEN25, vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-7b": dict(
        _QWEN25, vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
    "gemma2-2b": dict(
        _GEMMA2, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
        num_attention_heads=8, num_key_value_heads=4),
    "gemma2-9b": dict(
        _GEMMA2, hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
        num_attention_heads=16, num_key_value_heads=8),
    "qwen3-0.6b": dict(
        _QWEN3, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=True),
    "qwen3-8b": dict(
        _QWEN3, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    "gemma3-270m": dict(
        _GEMMA3, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
        num_attention_heads=4, num_key_value_heads=1),
    "gemma3-1b": dict(
        _GEMMA3, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
        num_attention_heads=4, num_key_value_heads=1, eos_token_id=(1, 106)),
    "gemma3-4b": dict(
        _GEMMA3, vocab_size=262208, hidden_size=2560, intermediate_size=10240,
        num_hidden_layers=34, num_attention_heads=8, num_key_value_heads=4, sliding_window=1024,
        max_position_embeddings=131072, rope_scaling={"rope_type": "linear", "factor": 8.0}),
}


def preset_names() -> list[str]:
  return list(PRESETS)


def get_preset(name: str, **overrides: Any) -> LlamaConfig:
  """The named config; ``overrides`` replace fields (e.g. ``dtype="bfloat16"``, ``remat="full"``)."""
  if name not in PRESETS:
    raise InputError(f"model: preset: expected one of {', '.join(PRESETS)}, got {name!r}")
  fields = {f.name for f in dataclasses.fields(LlamaConfig)}
  for key in overrides:
    if key not in fields:
      raise InputError(f"model: {key}: expected a LlamaConfig field, got an unknown name")
  kwargs = dict(PRESETS[name])
  if kwargs.get("rope_scaling"):
    kwargs["rope_scaling"] = dict(kwargs["rope_scaling"])
  kwargs.update(overrides)
  return LlamaConfig(**kwargs)


@dataclasses.dataclass(frozen=True)
class ParamStats:
  """num_params: total parameter count; total_bytes: at param_dtype; bytes_per_device: the largest
  per-device share on the given mesh (equal to total_bytes without a mesh)."""

  num_params: int
  total_bytes: int
  bytes_per_device: int

  def __str__(self) -> str:
    gib = 1024 ** 3
    return (f"{self.num_params / 1e9:.3f}B parameters, {self.total_bytes / gib:.2f} GiB, "
            f"{self.bytes_per_device / gib:.2f} GiB per device")


def abstract_state(config: LlamaConfig) -> Any:
  """The model's nnx.State with ShapeDtypeStruct leaves (nothing allocated)."""
  model = nnx.eval_shape(lambda: family.build(config, rngs=nnx.Rngs(0)))
  return nnx.state(model)


def param_stats(config: LlamaConfig | str,
                mesh: jax.sharding.Mesh | Mapping[str, int] | None = None) -> ParamStats:
  """Parameter count and memory for a config (or preset name) on an optional mesh / {axis: size}."""
  if isinstance(config, str):
    config = get_preset(config)
  state = abstract_state(config)
  leaves = jax.tree.leaves(state)
  num = sum(math.prod(x.shape) for x in leaves)
  total = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in leaves)
  per_device = total if mesh is None else shd.bytes_per_device(state, mesh)
  return ParamStats(num_params=int(num), total_bytes=int(total), bytes_per_device=int(per_device))
