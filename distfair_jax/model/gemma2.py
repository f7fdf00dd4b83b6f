"""Gemma 2 (``Gemma2ForCausalLM``) on the Llama family's modules.

What differs from Llama, and where it lives:

- config (``llama.LlamaConfig``, architecture ``Gemma2ForCausalLM``): GeGLU (``hidden_act
  gelu_pytorch_tanh``), attention scale ``query_pre_attn_scalar ** -0.5``, attention-logit and
  final-logit soft-capping, ``sliding_window`` on the layers ``layer_types`` marks (alternating,
  sliding first); the shared ``Attention``, ``MLP``, masks, KV cache, scan and ``logits()`` read
  them, so a Llama config keeps every one of them off;
- here: the norm ``x * (1 + w)`` computed in float32 (weights start at 0), the decoder layer's
  four norms (before and after attention, before and after the MLP), and the embedding scaled by
  ``sqrt(hidden_size)`` in the compute dtype.

Parameter names mirror transformers' (``model.layers.N.pre_feedforward_layernorm.weight`` is
``layers[N].pre_feedforward_layernorm.scale``); embeddings are tied (no ``lm_head``) unless the
config says otherwise. Note that ``post_attention_layernorm`` normalises the attention output
here, while in Llama it is the norm before the MLP: the names are transformers', per family.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from distfair_jax import sharding as shd
from distfair_jax.errors import InputError
from distfair_jax.model.layers import MLP, Attention, RMSNorm, _param_meta
from distfair_jax.model.llama import Llama
from distfair_jax.model.llama_config import LlamaConfig

__all__ = ["Gemma2", "Gemma2DecoderLayer", "GemmaRMSNorm", "hf_fields"]


class GemmaRMSNorm(RMSNorm):
  """RMSNorm as Gemma computes it: ``norm(x) * (1 + w)`` in float32, then cast; ``w`` starts at 0."""

  def __init__(self, dim: int, eps: float, *, dtype, param_dtype):
    super().__init__(dim, eps, dtype=dtype, param_dtype=param_dtype)
    self.scale = nnx.Param(jnp.zeros((dim,), param_dtype), **_param_meta("norm"))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., D] -> [..., D] in the compute dtype."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (y * (1.0 + self.scale[...].astype(jnp.float32))).astype(self.dtype)


class Gemma2DecoderLayer(nnx.Module):
  """x + post_norm(attn(pre_norm(x))), then x + post_ff_norm(mlp(pre_ff_norm(x))).
  ``attention_cls``: the attention module (Gemma 3 swaps in QK-norm)."""

  attention_cls: type = Attention

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    norm = lambda: GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=cfg.compute_dtype,
                                param_dtype=cfg.weight_dtype)
    self.input_layernorm = norm()
    self.self_attn = self.attention_cls(cfg, rngs=rngs)
    self.post_attention_layernorm = norm()
    self.pre_feedforward_layernorm = norm()
    self.mlp = MLP(cfg, rngs=rngs)
    self.post_feedforward_layernorm = norm()

  def __call__(self, x, cos, sin, mask, kv_cache=None, index=None):
    """x: [B, T, D] -> ([B, T, D], new kv cache or None); see ``llama.Attention``."""
    h, new_cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache, index)
    x = x + self.post_attention_layernorm(h)
    x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
    return shd.constrain(x, ("batch", "length", "act_embed")), new_cache


class Gemma2(Llama):
  """Gemma 2 decoder-only transformer returning hidden states after the final norm (the Llama
  interface: ``__call__``, ``logits`` (soft-capped), ``unembedding``, ``logit_softcap``,
  ``init_cache``, ``prefill``, ``decode_step``)."""

  decoder_layer_cls = Gemma2DecoderLayer
  norm_cls = GemmaRMSNorm

  model_type = "gemma2"  # the config this class builds (Gemma 3 subclasses it)

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    if config.model_type != self.model_type:
      raise ValueError(f"{type(self).__name__} needs a {self.model_type} config, got "
                       f"{config.architecture}")
    super().__init__(config, rngs=rngs)

  def _embed(self, input_ids: jax.Array) -> jax.Array:
    # transformers multiplies by sqrt(hidden_size) cast to the embedding's dtype (bfloat16:
    # sqrt(2304) = 48 exactly, sqrt(3584) rounds to 59.75).
    x = self.embed_tokens(input_ids.astype(jnp.int32))
    x = x * jnp.asarray(math.sqrt(self.config.hidden_size), x.dtype)
    return shd.constrain(x, ("batch", "length", "act_embed"))


def hf_fields(data: Mapping[str, Any], get, source: str) -> dict[str, Any]:
  """The Gemma 2 fields of a Hugging Face config (transformers' defaults where absent; an explicit
  null turns soft-capping off). transformers' Gemma 2 reads ``hidden_activation`` (null: the
  default, as transformers' Gemma does) and ignores ``hidden_act``."""
  act = get("hidden_activation") or "gelu_pytorch_tanh"
  if act != "gelu_pytorch_tanh":
    raise InputError(f"{source}: hidden_activation: expected gelu_pytorch_tanh, got {act!r}")
  if data.get("attention_bias", False):
    raise InputError(f"{source}: attention_bias: expected false (Gemma attention biases are "
                     f"not supported), got {data['attention_bias']!r}")
  if data.get("use_bidirectional_attention"):
    raise InputError(f"{source}: use_bidirectional_attention: expected false or null (causal "
                     f"attention), got {data['use_bidirectional_attention']!r}")
  if data.get("attention_dropout") not in (None, 0, 0.0):
    raise InputError(f"{source}: attention_dropout: expected 0, got {data['attention_dropout']!r}")
  return dict(hidden_act="gelu_pytorch_tanh", query_pre_attn_scalar=get("query_pre_attn_scalar"),
              attn_logit_softcapping=get("attn_logit_softcapping"),
              final_logit_softcapping=get("final_logit_softcapping"),
              sliding_window=get("sliding_window"), layer_types=data.get("layer_types"))
