"""Qwen3 (``Qwen3ForCausalLM``, the dense 0.6B-32B models) on the Llama family's modules.

What differs from Qwen2, and where it lives:

- config (``llama.LlamaConfig``, architecture ``Qwen3ForCausalLM``; :func:`hf_fields` reads the
  Hugging Face fields): no attention biases (Qwen2 has q/k/v biases), ``head_dim`` independent of
  ``hidden_size / num_attention_heads`` (Qwen3-0.6B: 16 heads of 128 over a hidden size of 1024),
  tied (0.6B-4B) or untied (8B up) embeddings;
- here: RMSNorm on the queries and keys of every head (QK-norm, one ``[head_dim]`` weight each,
  ``self_attn.q_norm`` / ``self_attn.k_norm``), after the projections and before RoPE.

Qwen3's optional sliding-window attention (``use_sliding_window``, off in every released
checkpoint), attention biases and RoPE scaling other than ``linear`` / ``llama3`` are refused with
one line naming the field and its value. Gemma 3 reuses :class:`QKNormAttention` with its own norm.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
from flax import nnx

from distfair_jax.errors import InputError
from distfair_jax.model.layers import Attention, DecoderLayer, RMSNorm
from distfair_jax.model.llama import Llama
from distfair_jax.model.llama_config import LlamaConfig

__all__ = ["Qwen3", "Qwen3DecoderLayer", "QKNormAttention", "hf_fields"]


class QKNormAttention(Attention):
  """``llama.Attention`` with a norm over each query and key head before RoPE (``norm_cls``:
  ``RMSNorm`` here, Gemma's ``(1 + w)`` norm in Gemma 3). Parameters ``q_norm.scale`` and
  ``k_norm.scale``: [head_dim] each, shared by all heads."""

  norm_cls: type = RMSNorm

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    norm = lambda: self.norm_cls(cfg.head_dim, cfg.rms_norm_eps, dtype=cfg.compute_dtype,
                                 param_dtype=cfg.weight_dtype)
    self.q_norm = norm()
    self.k_norm = norm()

  def _norm_qk(self, q: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
    """q: [B, T, heads, hd], k: [B, T, kv_heads, hd] -> the same shapes, each head normalised."""
    return self.q_norm(q), self.k_norm(k)


class Qwen3DecoderLayer(DecoderLayer):
  """Llama's pre-norm block with QK-norm attention."""

  attention_cls = QKNormAttention


class Qwen3(Llama):
  """Qwen3 decoder-only transformer (the Llama interface: ``__call__`` returns hidden states after
  the final norm; ``logits``, ``unembedding``, ``init_cache``, ``prefill``, ``decode_step``)."""

  decoder_layer_cls = Qwen3DecoderLayer

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    if config.model_type != "qwen3":
      raise ValueError(f"Qwen3 needs a Qwen3ForCausalLM config, got {config.architecture}")
    super().__init__(config, rngs=rngs)


def hf_fields(data: Mapping[str, Any], get: Callable[..., Any], source: str) -> dict[str, Any]:
  """The Qwen3-specific reading of a Hugging Face config dict ``data`` (``get(field, default)``
  falls back on transformers' defaults): refuses what the model does not implement, in one line
  naming ``source``, the field and its value. Returns LlamaConfig keyword arguments."""
  if data.get("attention_bias", False):
    raise InputError(f"{source}: attention_bias: expected false (Qwen3 has no attention biases), "
                     f"got {data['attention_bias']!r}")
  if data.get("hidden_act", "silu") != "silu":
    raise InputError(f"{source}: hidden_act: expected silu, got {data['hidden_act']!r}")
  if data.get("use_sliding_window", False):
    raise InputError(f"{source}: use_sliding_window: expected false (Qwen3's sliding-window "
                     f"attention is not supported), got {data['use_sliding_window']!r}")
  types = data.get("layer_types")
  if isinstance(types, (list, tuple)) and any(t != "full_attention" for t in types):
    bad = next(t for t in types if t != "full_attention")
    raise InputError(f"{source}: layer_types: expected full_attention on every layer, got {bad!r}")
  if data.get("attention_dropout") not in (None, 0, 0.0):
    raise InputError(f"{source}: attention_dropout: expected 0, got {data['attention_dropout']!r}")
  return {}
