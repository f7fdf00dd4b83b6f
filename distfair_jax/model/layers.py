"""The Llama family's layers: RoPE (Hugging Face's half-split layout), RMSNorm, attention (full,
KV-cached and shared-prefix), the gated MLP and the decoder layer; every parameter with its logical
axis names."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from distfair_jax import sharding as shd
from distfair_jax.losses import soft_cap
from distfair_jax.model.cache import SharedKV
from distfair_jax.model.llama_config import LlamaConfig


# ------------------------------------------------------------------------------------------------
# RoPE
# ------------------------------------------------------------------------------------------------


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
  """Inverse frequencies ``[head_dim // 2]`` float32, with llama3 / linear scaling applied."""
  dim = config.head_dim
  inv = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
  sc = config.rope_scaling
  if sc is None:
    pass
  elif sc["rope_type"] == "linear":
    inv = inv / sc["factor"]
  elif sc["rope_type"] == "llama3":
    factor, low, high = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
    old_len = sc["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    inv = np.where(medium, smoothed, scaled)
  return inv.astype(np.float32)


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
  """positions: [B, T] int -> (cos, sin): [B, T, head_dim] float32 (half-split layout)."""
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x: [B, T, N, head_dim]; cos, sin: [B, T, head_dim] -> [B, T, N, head_dim] (x's dtype)."""
  xf = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
  return (xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]).astype(x.dtype)


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
  """attention_mask: [B, L] (1 real, 0 pad) -> positions [B, L] int32 = cumsum(mask) - 1, >= 0."""
  return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


# ------------------------------------------------------------------------------------------------
# Modules
# ------------------------------------------------------------------------------------------------


def _param_meta(*names: str) -> dict[str, Any]:
  return {"out_sharding": tuple(names), "eager_sharding": False}


def _linear(cfg: LlamaConfig, n_in: int, n_out: int, axes: tuple[str, str], *, bias: bool,
            rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(
      n_in, n_out, use_bias=bias, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
      kernel_init=nnx.initializers.normal(cfg.initializer_range),
      bias_init=nnx.initializers.zeros_init(), rngs=rngs,
      kernel_metadata=_param_meta(*axes), bias_metadata=_param_meta(axes[1]))


class RMSNorm(nnx.Module):
  """RMSNorm as in Hugging Face: normalise in float32, cast to the compute dtype, then scale."""

  def __init__(self, dim: int, eps: float, *, dtype: Any, param_dtype: Any):
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), **_param_meta("norm"))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., D] -> [..., D] in the compute dtype."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(self.dtype) * y.astype(self.dtype)


class Attention(nnx.Module):
  """Grouped-query self-attention with separate q/k/v/o projections (LoRA can wrap each)."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    d, h, kv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    self.q_proj = _linear(cfg, d, h * hd, ("embed", "heads"), bias=cfg.attention_bias, rngs=rngs)
    self.k_proj = _linear(cfg, d, kv * hd, ("embed", "kv_heads"), bias=cfg.attention_bias,
                          rngs=rngs)
    self.v_proj = _linear(cfg, d, kv * hd, ("embed", "kv_heads"), bias=cfg.attention_bias,
                          rngs=rngs)
    # transformers' Llama biases o_proj too when attention_bias is set; Qwen2 never does
    self.o_proj = _linear(cfg, h * hd, d, ("heads", "embed"),
                          bias=cfg.attention_bias and cfg.model_type == "llama", rngs=rngs)
    self.num_heads, self.num_kv_heads, self.head_dim = h, kv, hd
    self.scale = cfg.attention_scale
    self.softcap = cfg.attn_logit_softcapping

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
               kv_cache: tuple[jax.Array, jax.Array] | None = None,
               index: jax.Array | None = None):
    """x: [B, T, D]; cos/sin: [B, T, head_dim]; mask: [B, T, S] bool (S = T without a cache).

    With ``kv_cache = (k, v)`` ([B, kv_heads, S, head_dim] each) the new keys/values are written at
    slot ``index`` and attention runs over all S slots. Returns (out [B, T, D], new (k, v) or None).
    """
    b, t, _ = x.shape
    q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    q, k = self._norm_qk(q, k)
    q = shd.constrain(apply_rope(q, cos, sin), ("batch", "length", "heads", "head_dim"))
    k = shd.constrain(apply_rope(k, cos, sin), ("batch", "length", "kv_heads", "head_dim"))
    v = shd.constrain(v, ("batch", "length", "kv_heads", "head_dim"))
    new_cache = None
    if isinstance(kv_cache, SharedKV):
      out, new_cache = self._shared_prefix_attention(q, k, v, mask, kv_cache, index)
    elif kv_cache is not None:
      out, new_cache = self._cached_attention(q, k, v, mask, kv_cache, index)
    elif self.softcap is None:
      out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, :, :], scale=self.scale)
    else:  # soft-capped scores: dot_product_attention has no such option
      out = self._attend(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask)
    out = shd.constrain(out, ("batch", "length", "heads", "head_dim"))
    return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim)), new_cache

  def _norm_qk(self, q: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Queries [B, T, heads, hd] and keys [B, T, kv_heads, hd] before RoPE: unchanged here;
    Qwen3 and Gemma 3 normalise each head (``qwen3.QKNormAttention``)."""
    return q, k

  def _cached_attention(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                        kv_cache: tuple[jax.Array, jax.Array], index: jax.Array):
    """Writes k/v into the cache at slot ``index``, then attends over all its S slots.

    q: [B, T, heads, head_dim]; k, v: [B, T, kv_heads, head_dim]; mask: [B, T, S] bool;
    kv_cache: ([B, kv_heads, S, head_dim], same). Returns (out [B, T, heads, head_dim], new cache).

    The cache keeps kv_heads before S so that both attention contractions read it in place (batch
    dims b, kv_heads lead); only the T new rows and the queries are transposed. Query heads are
    grouped per kv head ([B, kv_heads, group * T, head_dim]), so repeated keys/values are never
    materialised. Same arithmetic as ``jax.nn.dot_product_attention``: f32 logits and softmax,
    probabilities cast to the value dtype.
    """
    ck, cv = kv_cache
    zero = jnp.zeros((), jnp.int32)
    start = (zero, zero, index, zero)
    ck = jax.lax.dynamic_update_slice(ck, k.transpose(0, 2, 1, 3).astype(ck.dtype), start)
    cv = jax.lax.dynamic_update_slice(cv, v.transpose(0, 2, 1, 3).astype(cv.dtype), start)
    return self._attend(q, ck.astype(q.dtype), cv.astype(q.dtype), mask), (ck, cv)

  def _shared_prefix_attention(self, q: jax.Array, k: jax.Array, v: jax.Array,
                               mask: tuple[jax.Array, jax.Array], kv: SharedKV, index: jax.Array):
    """One decode step over a shared prompt cache plus a per-row cache of the new tokens.

    q: [N, 1, heads, head_dim]; k, v: [N, 1, kv_heads, head_dim] (N = P * rounds, rows in
    prompt-major order); mask: (prefix [P, L] bool, new [N or 1, T] bool); kv: ``SharedKV``. The new
    k/v are written at slot ``index`` of the per-row part. Returns (out [N, 1, heads, head_dim],
    the per-row keys [N, kv_heads, head_dim, T] and values [N, kv_heads, T, head_dim]).
    """
    zero = jnp.zeros((), jnp.int32)
    ck = jax.lax.dynamic_update_slice(kv.k, k.transpose(0, 2, 3, 1).astype(kv.k.dtype),
                                      (zero, zero, zero, index))
    cv = jax.lax.dynamic_update_slice(kv.v, v.transpose(0, 2, 1, 3).astype(kv.v.dtype),
                                      (zero, zero, index, zero))
    out = self._attend_shared(q[:, 0], kv.prefix_k.astype(q.dtype), kv.prefix_v.astype(q.dtype),
                              ck.astype(q.dtype), cv.astype(q.dtype), *mask)
    return out[:, None], (ck, cv)

  def _attend_shared(self, q: jax.Array, prefix_k: jax.Array, prefix_v: jax.Array,
                     new_k: jax.Array, new_v: jax.Array, prefix_mask: jax.Array,
                     new_mask: jax.Array) -> jax.Array:
    """Attention of one query per row over [prompt slots | new slots], one softmax.

    q: [N, heads, hd]; prefix_k, prefix_v: [P, kv_heads, L, hd] (each prompt's slots, stored once);
    new_k: [N, kv_heads, hd, T] (keys transposed: each row's scores are then a plain [G, hd] x
    [hd, T] product, which XLA:CPU runs ~4x faster than the same contraction over [T, hd] keys);
    new_v: [N, kv_heads, T, hd]; prefix_mask: [P, L] bool; new_mask: [N or 1, T] bool.
    Returns [N, heads, hd]. The queries of a prompt's R = N / P rounds and its G query heads per kv
    head form one [R * G, hd] block per (prompt, kv head), so the prompt's keys and values are read
    once per prompt in one batched matmul, not once per row. The scores of both parts are
    concatenated (the plain cache's slot order: prompt, then new tokens) and scaled, soft-capped,
    masked and normalised exactly as ``_attend`` does.
    """
    n, h, hd = q.shape
    p, kvh, length, _ = prefix_k.shape
    r, g, t = n // p, h // kvh, new_v.shape[2]
    acc = jnp.promote_types(q.dtype, jnp.float32)
    q_rows = q.reshape(n, kvh, g, hd)
    to_prompt = lambda a: a.reshape(p, r, kvh, g, -1).transpose(0, 2, 1, 3, 4).reshape(p, kvh, r * g, -1)
    to_rows = lambda a: a.reshape(p, kvh, r, g, -1).transpose(0, 2, 1, 3, 4).reshape(n, kvh, g, -1)
    s_prefix = jnp.einsum("pkqd,pksd->pkqs", to_prompt(q_rows), prefix_k,
                          preferred_element_type=acc)  # [P, kv_heads, R * G, L]
    s_new = jnp.einsum("nkgd,nkds->nkgs", q_rows, new_k, preferred_element_type=acc)  # [N, kvh, G, T]
    logits = jnp.concatenate([to_rows(s_prefix), s_new], axis=-1)  # [N, kv_heads, G, L + T]
    logits = (logits * jnp.asarray(self.scale, logits.dtype)).astype(jnp.float32)
    logits = soft_cap(logits, self.softcap)
    visible = jnp.concatenate([jnp.repeat(prefix_mask, r, axis=0),
                               jnp.broadcast_to(new_mask, (n, t))], axis=-1)  # [N, L + T]
    logits = jnp.where(visible[:, None, None, :], logits,
                       jnp.float32(-0.7 * float(jnp.finfo(jnp.float32).max)))
    probs = jax.nn.softmax(logits, axis=-1).astype(new_v.dtype)
    out_prefix = jnp.einsum("pkqs,pksd->pkqd", to_prompt(probs[..., :length]), prefix_v)
    out_new = jnp.einsum("nkgs,nksd->nkgd", probs[..., length:], new_v)  # [N, kv_heads, G, hd]
    return (to_rows(out_prefix) + out_new).reshape(n, h, hd)

  def _attend(self, q: jax.Array, keys: jax.Array, values: jax.Array,
              mask: jax.Array) -> jax.Array:
    """q: [B, T, heads, hd]; keys, values: [B, kv_heads, S, hd]; mask: [B, T, S] bool ->
    [B, T, heads, hd]. Scores scaled, soft-capped when the config says so (``c * tanh(x / c)``,
    before the mask, as transformers does), then masked."""
    b, t, h, hd = q.shape
    kvh, s = self.num_kv_heads, keys.shape[2]
    g = h // kvh
    # [B, T, heads, hd] -> [B, kv_heads, group * T, hd] (a free reshape when T == 1).
    qg = q.reshape(b, t, kvh, g, hd).transpose(0, 2, 3, 1, 4).reshape(b, kvh, g * t, hd)
    logits = jnp.einsum("bkqd,bksd->bkqs", qg, keys,
                        preferred_element_type=jnp.promote_types(q.dtype, jnp.float32))
    logits = (logits * jnp.asarray(self.scale, logits.dtype)).astype(jnp.float32)
    logits = soft_cap(logits, self.softcap)
    logits = jnp.where(mask[:, None, None, :, :], logits.reshape(b, kvh, g, t, s),
                       jnp.float32(-0.7 * float(jnp.finfo(jnp.float32).max)))
    probs = jax.nn.softmax(logits, axis=-1).astype(values.dtype).reshape(b, kvh, g * t, s)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, values)  # [B, kv_heads, group * T, hd]
    out = out.reshape(b, kvh, g, t, hd).transpose(0, 3, 1, 2, 4)
    return out.reshape(b, t, h, hd)


_ACTIVATIONS = {"silu": jax.nn.silu,
                "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True)}


class MLP(nnx.Module):
  """Gated MLP: down(act(gate(x)) * up(x)), act silu (SwiGLU) or tanh-approximate gelu (GeGLU)."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    d, f = cfg.hidden_size, cfg.intermediate_size
    self.gate_proj = _linear(cfg, d, f, ("embed", "mlp"), bias=False, rngs=rngs)
    self.up_proj = _linear(cfg, d, f, ("embed", "mlp"), bias=False, rngs=rngs)
    self.down_proj = _linear(cfg, f, d, ("mlp", "embed"), bias=False, rngs=rngs)
    self.activation = cfg.hidden_act

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, T, D] -> [B, T, D]."""
    if x.shape[1] == 1 and type(self.gate_proj) is type(self.up_proj) is nnx.Linear:
      gate, up = self._gate_up(x)
    else:
      gate, up = self.gate_proj(x), self.up_proj(x)
    h = _ACTIVATIONS[self.activation](gate) * up
    return self.down_proj(shd.constrain(h, ("batch", "length", "mlp")))

  def _gate_up(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A decode step's gate and up projections as ONE matmul against the kernels stacked to
    [D, 2, F] (F keeps its sharding): with one token per row XLA:CPU runs the [B, D] x [D, 2F]
    product ~1.5x faster than two [B, D] x [D, F] ones. Inside the decode loop the stacking is
    loop-invariant (hoisted); each output element is the same dot product as ``nnx.Linear``'s."""
    g, u = self.gate_proj, self.up_proj
    x, kernel = nnx.nn.dtypes.promote_dtype(
        (x, jnp.stack([g.kernel[...], u.kernel[...]], axis=1)), dtype=g.dtype)
    y = jnp.einsum("btd,dcf->btcf", x, kernel, precision=g.precision)  # [B, 1, 2, F]
    return y[:, :, 0], y[:, :, 1]


class DecoderLayer(nnx.Module):
  """Pre-norm decoder block: x + attn(norm(x)), then x + mlp(norm(x)). ``attention_cls``: the
  attention module a family's subclass swaps in (Qwen3's QK-norm)."""

  attention_cls: type = Attention

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
    self.self_attn = self.attention_cls(cfg, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x, cos, sin, mask, kv_cache=None, index=None):
    """x: [B, T, D] -> ([B, T, D], new kv cache or None); see Attention for the other args."""
    h, new_cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache, index)
    x = x + h
    x = x + self.mlp(self.post_attention_layernorm(x))
    return shd.constrain(x, ("batch", "length", "act_embed")), new_cache
