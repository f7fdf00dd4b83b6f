"""Gemma 3 text (``Gemma3ForCausalLM``, ``Gemma3TextConfig``: 270M, 1B and the text tower of
4B-27B) on Gemma 2's modules.

What differs from Gemma 2, and where it lives:

- config (``llama.LlamaConfig``, architecture ``Gemma3ForCausalLM``; :func:`hf_fields` reads the
  Hugging Face fields): ``layer_types`` five sliding-window layers to one global by default
  (``sliding_window_pattern`` 6), two RoPE bases: ``rope_theta`` (and ``rope_scaling``, e.g. the
  4B's linear factor 8) on the global layers, ``rope_local_base_freq`` (10000, unscaled) on the
  sliding ones (transformers 5.x nests both in ``rope_parameters``); no final-logit soft-capping by
  default;
  attention scale ``query_pre_attn_scalar ** -0.5``;
- here: QK-norm with Gemma's ``(1 + w)`` norm (``self_attn.q_norm`` / ``k_norm``, [head_dim]), and
  the per-layer choice of RoPE (:meth:`Gemma3._ropes`), which the shared forward, KV cache and
  shared-prefix decoding select per layer as they select the sliding-window mask.

Kept from Gemma 2: the four ``(1 + w)`` norms per layer, GeGLU, embeddings scaled by
``sqrt(hidden_size)`` (in the embedding's dtype, as transformers does), tied embeddings.
Refused in one line naming the field and its value: attention biases, bidirectional attention, a
non-default RoPE on the sliding layers, an activation other than ``gelu_pytorch_tanh``, and
``attn_logit_softcapping`` (a Gemma3TextConfig field that transformers' Gemma 3 attention never
reads: released checkpoints set it null). ``final_logit_softcapping`` is applied when set.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import numpy as np
from flax import nnx

from distfair_jax.errors import InputError
from distfair_jax.model import gemma2
from distfair_jax.model.gemma2 import Gemma2, Gemma2DecoderLayer, GemmaRMSNorm
from distfair_jax.model.layers import rope_cos_sin, rope_inv_freq
from distfair_jax.model.llama_config import LlamaConfig, sliding_layer_types
from distfair_jax.model.qwen3 import QKNormAttention

__all__ = ["Gemma3", "Gemma3DecoderLayer", "Gemma3Attention", "hf_fields", "local_inv_freq"]


class Gemma3Attention(QKNormAttention):
  """QK-norm attention with Gemma's ``(1 + w)`` norm (weights start at 0)."""

  norm_cls = GemmaRMSNorm


class Gemma3DecoderLayer(Gemma2DecoderLayer):
  """Gemma 2's four-norm block with QK-norm attention."""

  attention_cls = Gemma3Attention


def local_inv_freq(config: LlamaConfig) -> np.ndarray:
  """The sliding-window layers' RoPE inverse frequencies [head_dim // 2] float32: base
  ``rope_local_base_freq`` (``rope_theta`` when None), never scaled."""
  local = config.rope_local_base_freq or config.rope_theta
  return rope_inv_freq(config.replace(rope_theta=local, rope_scaling=None))


class Gemma3(Gemma2):
  """Gemma 3 decoder-only transformer (the Llama interface; see ``gemma2.Gemma2``)."""

  decoder_layer_cls = Gemma3DecoderLayer
  model_type = "gemma3"

  def _ropes(self, positions: jax.Array) -> tuple[tuple[jax.Array, jax.Array], ...]:
    """positions [B, T] -> ((cos, sin) of the global layers, (cos, sin) of the sliding-window
    layers), each [B, T, head_dim] float32."""
    return (rope_cos_sin(positions, rope_inv_freq(self.config)),
            rope_cos_sin(positions, local_inv_freq(self.config)))


def _local_theta(data: Mapping[str, Any], get: Callable[..., Any], source: str) -> Any:
  """The sliding layers' RoPE base: ``rope_parameters.sliding_attention`` (transformers 5.x,
  which must be unscaled) or ``rope_local_base_freq`` (4.x)."""
  nested = data.get("rope_parameters")
  local = nested.get("sliding_attention") if isinstance(nested, Mapping) else None
  if local is None:
    return get("rope_local_base_freq")
  if not isinstance(local, Mapping):
    raise InputError(f"{source}: rope_parameters.sliding_attention: expected a mapping, got "
                     f"{local!r}")
  rope_type = local.get("rope_type", local.get("type", "default"))
  if rope_type not in (None, "default"):
    raise InputError(f"{source}: rope_parameters.sliding_attention.rope_type: expected default "
                     f"(the sliding layers' RoPE is never scaled), got {rope_type!r}")
  return local.get("rope_theta", get("rope_local_base_freq"))


def hf_fields(data: Mapping[str, Any], get: Callable[..., Any], source: str) -> dict[str, Any]:
  """The Gemma 3-specific reading of a Hugging Face config dict ``data`` (``get(field, default)``
  falls back on transformers' defaults): Gemma 2's checks and fields, soft-capping off unless the
  config sets it, ``layer_types`` from ``sliding_window_pattern`` when only that is given, the
  sliding layers' RoPE base. Returns LlamaConfig keyword arguments."""
  fields = gemma2.hf_fields(data, get, source)
  if data.get("attn_logit_softcapping") is not None:
    raise InputError(f"{source}: attn_logit_softcapping: expected null (transformers' Gemma 3 "
                     f"never applies it), got {data['attn_logit_softcapping']!r}")
  fields["attn_logit_softcapping"] = None
  fields["final_logit_softcapping"] = data.get("final_logit_softcapping")
  pattern = data.get("sliding_window_pattern")
  if fields["layer_types"] is None and pattern is not None:
    if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern <= 0:
      raise InputError(f"{source}: sliding_window_pattern: expected a positive integer, got "
                       f"{pattern!r}")
    fields["layer_types"] = sliding_layer_types(data["num_hidden_layers"], pattern)
  fields["rope_local_base_freq"] = _local_theta(data, get, source)
  return fields
