"""Flax NNX Llama family: Llama 2/3/3.x (RoPE scaling, GQA), Qwen2 (q/k/v biases), tied embeddings;
Gemma 2, Qwen3 and Gemma 3 reuse these modules (``distfair_jax.model.{gemma2,qwen3,gemma3}``).

The parameter tree mirrors Hugging Face's names so that a converter maps tensors one to one:

  embed_tokens.embedding                        [vocab, hidden]          (HF model.embed_tokens.weight)
  layers[i].self_attn.{q,k,v}_proj.kernel       [hidden, heads*head_dim]  (HF weight, transposed)
  layers[i].self_attn.{q,k,v}_proj.bias         [heads*head_dim]          (only when attention_bias)
  layers[i].self_attn.o_proj.bias               [hidden]                  (Llama with attention_bias)
  layers[i].self_attn.o_proj.kernel             [heads*head_dim, hidden]
  layers[i].mlp.{gate,up}_proj.kernel           [hidden, intermediate]
  layers[i].mlp.down_proj.kernel                [intermediate, hidden]
  layers[i].{input,post_attention}_layernorm.scale  [hidden]
  norm.scale                                    [hidden]
  lm_head.kernel                                [hidden, vocab]           (absent when tied)

With ``scan_layers`` the layers are one subtree ``layers.*`` whose leaves gain a leading
``[num_layers]`` axis (logical name ``layers``, never sharded); params directories on disk keep the
per-layer names above (``distfair_jax.model.layout``).

Config-driven features the family shares (Gemma 2 sets them; Llama and Qwen2 leave them off):
attention-logit and final-logit soft-capping (``c * tanh(x / c)``), an attention scale from
``query_pre_attn_scalar``, GeGLU (``hidden_act``), and sliding-window attention on the layers that
``layer_types`` marks ``sliding_attention`` (a key is visible when ``q_pos - k_pos < sliding_window``,
by RoPE position, in the full forward and in the KV cache alike).

RoPE uses Hugging Face's half-split layout (rotate_half), so converted q/k weights need no permutation.
Every parameter carries logical axis names in its ``out_sharding`` metadata (eager sharding off: the
model never shards itself; ``distfair_jax.sharding`` places it on a mesh from one rules table).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from distfair_jax import sharding as shd
from distfair_jax.losses import soft_cap
from distfair_jax.model.cache import KVCache, SharedKV, SharedPrefixCache
from distfair_jax.model.layers import (DecoderLayer, RMSNorm, _linear, _param_meta,
                                       positions_from_mask, rope_cos_sin, rope_inv_freq)
from distfair_jax.model.llama_config import DTYPES, LlamaConfig

__all__ = ["Llama", "LlamaConfig"]

_SCAN_METADATA = {nnx.PARTITION_NAME: "layers"}  # the stacked axis's logical name


def _decoder_layers(cfg: LlamaConfig, rngs: nnx.Rngs, layer_cls: type = DecoderLayer):
  """The decoder layers: an ``nnx.List`` of modules, or with ``scan_layers`` one module whose
  every parameter is stacked on a leading ``layers`` axis (built by ``nnx.vmap`` over split
  keys, as Flax's scan-over-layers example does)."""
  n = cfg.num_hidden_layers
  if not cfg.scan_layers:
    return nnx.List([layer_cls(cfg, rngs=rngs) for _ in range(n)])

  @nnx.split_rngs(splits=n)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=_SCAN_METADATA)
  def create(rngs: nnx.Rngs):
    return layer_cls(cfg, rngs=rngs)

  return create(rngs)


def _layer_mask(masks: tuple[Any, ...], sliding) -> Any:
  """One layer's attention mask (or RoPE (cos, sin)): ``masks`` is (full,) or (full, sliding
  window), each an array or a pair of arrays (shared-prefix decoding's masks, a RoPE's cos and
  sin); ``sliding`` a Python bool (the layer loop) or a traced one (a scanned layer's flag)."""
  if len(masks) == 1:
    return masks[0]
  if isinstance(sliding, (bool, np.bool_)):
    return masks[1] if sliding else masks[0]
  return jax.tree.map(lambda full, window: jnp.where(sliding, window, full), masks[0], masks[1])


class Llama(nnx.Module):
  """Llama / Qwen2 decoder-only transformer returning hidden states after the final norm.

  Subclasses (``gemma2.Gemma2``) swap the decoder layer and norm classes and the embedding; the
  forward, the masks, the KV cache and the scan over layers are shared.
  """

  decoder_layer_cls: type = DecoderLayer
  norm_cls: type = RMSNorm

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    cfg = config
    if type(self) is Llama and cfg.model_type != "llama" and cfg.model_type != "qwen2":
      raise ValueError(f"Llama: a {cfg.architecture} config needs its own module class; build "
                       f"it with distfair_jax.model.family.build(config, rngs=...)")
    self.config = cfg
    self.embed_tokens = nnx.Embed(
        cfg.vocab_size, cfg.hidden_size, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
        embedding_init=nnx.initializers.normal(cfg.initializer_range), rngs=rngs,
        embedding_metadata=_param_meta("vocab", "embed"))
    self.layers = _decoder_layers(cfg, rngs, self.decoder_layer_cls)
    self.norm = self.norm_cls(cfg.hidden_size, cfg.rms_norm_eps, dtype=cfg.compute_dtype,
                              param_dtype=cfg.weight_dtype)
    if not cfg.tie_word_embeddings:
      self.lm_head = _linear(cfg, cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), bias=False,
                             rngs=rngs)

  # -- full-sequence forward ----------------------------------------------------------------------

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
               positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None) -> jax.Array:
    """input_ids: [B, L] int; attention_mask: [B, L] (1 real, 0 pad; left or right padding).

    Shared-prefix packing (``segment_ids`` given, ``attention_mask`` ignored): segment_ids [B, L] int
    with 0 = pad, 1 = a prefix every later token sees, s >= 2 = a branch that sees the prefix and
    its own earlier tokens only; positions [B, L] int, the RoPE position of each token (a branch
    continues from the prefix's length). Each branch's hidden states then equal those of the
    separate sequence prefix + branch.

    Returns hidden: [B, L, D] (compute dtype), after the final norm.
    """
    length = input_ids.shape[1]
    idx = jnp.arange(length)
    causal = idx[None, :, None] >= idx[None, None, :]
    if segment_ids is not None:
      if positions is None:
        raise ValueError("segment_ids need explicit positions")
      seg_q, seg_k = segment_ids[:, :, None], segment_ids[:, None, :]
      visible = (seg_k != 0) & ((seg_k == 1) | (seg_k == seg_q))
    else:
      if attention_mask is None:
        attention_mask = jnp.ones(input_ids.shape, jnp.int32)
      if positions is None:
        positions = positions_from_mask(attention_mask)
      visible = attention_mask.astype(bool)[:, None, :]
    ropes = self._ropes(positions)
    # Pad queries may always see themselves, so no softmax row is empty.
    diagonal = (idx[:, None] == idx[None, :])[None]
    masks = self._masks(causal & visible, diagonal, positions, positions)
    x = self._embed(input_ids)

    def run_layer(x, layer: DecoderLayer, sliding, ropes, masks):
      cos, sin = _layer_mask(ropes, sliding)
      return layer(x, cos, sin, _layer_mask(masks, sliding))[0]

    if self.config.remat != "none":
      policy = (None if self.config.remat == "full"
                else jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
      run_layer = nnx.remat(run_layer, policy=policy)
    if self.config.scan_layers:
      x = nnx.scan(run_layer, in_axes=(nnx.Carry, 0, 0, None, None), out_axes=nnx.Carry,
                   transform_metadata=_SCAN_METADATA)(
                       x, self.layers, jnp.asarray(self.config.is_sliding), ropes, masks)
    else:
      for layer, sliding in zip(self.layers, self.config.is_sliding):
        x = run_layer(x, layer, sliding, ropes, masks)
    return self.norm(x)

  def _ropes(self, positions: jax.Array) -> tuple[tuple[jax.Array, jax.Array], ...]:
    """positions [B, T] -> ((cos, sin),): one RoPE for every layer, chosen per layer as the masks
    are (``_layer_mask``); Gemma 3 returns (global, sliding-window) pairs."""
    return (rope_cos_sin(positions, rope_inv_freq(self.config)),)

  def _masks(self, visible: jax.Array, diagonal: jax.Array, q_pos: jax.Array,
             k_pos: jax.Array) -> tuple[jax.Array, ...]:
    """(full,) or, with sliding-window layers, (full, sliding): [B, T, S] bool each.

    visible: [B, T, S] causal and padding visibility; diagonal: [1 or B, T, S], each query's own
    slot (always visible, so no softmax row is empty); q_pos [B, T], k_pos [B, S]: RoPE
    positions. A sliding-window layer also needs ``q_pos - k_pos < sliding_window`` (positions,
    not slots, so packed branches and left padding count real tokens only).
    """
    full = visible | diagonal
    if not any(self.config.is_sliding):
      return (full,)
    window = (q_pos[:, :, None] - k_pos[:, None, :]) < self.config.sliding_window
    return full, (visible & window) | diagonal

  def _embed(self, input_ids: jax.Array) -> jax.Array:
    x = self.embed_tokens(input_ids.astype(jnp.int32))
    return shd.constrain(x, ("batch", "length", "act_embed"))

  @property
  def logit_softcap(self) -> float | None:
    """The final-logit soft-cap ``c`` (logits ``c * tanh(z / c)``), or None: what every consumer
    of ``unembedding()`` passes to the losses (``losses.token_logps_from_hidden(...,
    softcap=...)``, ``losses.steering_logits_from_hidden``); ``logits()`` applies it itself."""
    return self.config.final_logit_softcapping

  # -- output projection --------------------------------------------------------------------------

  def unembedding(self) -> jax.Array:
    """The output projection [D, V] (embed_tokens transposed when tied), in the compute dtype."""
    if self.config.tie_word_embeddings:
      w = self.embed_tokens.embedding[...].T
    else:
      w = self.lm_head.kernel[...]
    return w.astype(self.config.compute_dtype)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """hidden: [..., D] -> logits [..., V] float32 (matmul in the compute dtype, f32 accumulate;
    soft-capped when the config has a final_logit_softcapping)."""
    w = self.unembedding()
    out = jnp.einsum("...d,dv->...v", hidden.astype(w.dtype), w,
                     preferred_element_type=jnp.float32)
    out = soft_cap(out, self.logit_softcap)
    if out.ndim == 3:
      out = shd.constrain(out, ("batch", "length", "vocab"))
    return out

  # -- KV-cache decoding --------------------------------------------------------------------------

  def init_cache(self, batch: int, max_length: int, dtype: Any = None) -> KVCache:
    """An empty cache for ``batch`` rows and ``max_length`` slots (prompt + generated tokens)."""
    return KVCache.empty(self.config, batch, max_length, dtype)

  def prefill(self, input_ids: jax.Array, attention_mask: jax.Array,
              cache: KVCache) -> tuple[jax.Array, KVCache]:
    """input_ids, attention_mask: [B, T] -> (hidden [B, T, D], cache advanced by T slots).

    Writes at ``cache.index``; the caller keeps ``index + T <= max_length`` (shapes are static,
    an overflowing write is clamped by ``dynamic_update_slice``, not detected).
    """
    return self._extend(input_ids, attention_mask, cache)

  def decode_step(self, token_ids: jax.Array, cache: KVCache | SharedPrefixCache):
    """token_ids: [B, 1] -> (hidden [B, 1, D], cache advanced by one slot); ``cache`` a ``KVCache``
    or a ``SharedPrefixCache`` (same hidden states, up to float summation order)."""
    if isinstance(cache, SharedPrefixCache):
      return self._decode_shared(token_ids, cache)
    return self._extend(token_ids, jnp.ones(token_ids.shape, jnp.int32), cache)

  def shared_prefix_cache(self, cache: KVCache, rounds: int, new_length: int,
                          dtype: Any = None) -> SharedPrefixCache:
    """The prefilled prompt cache ``cache`` (P rows, every slot a prompt slot or left padding) kept
    once per prompt, with an empty per-row part for ``rounds`` continuations of each prompt of up
    to ``new_length`` tokens: rows [P] -> [P * rounds], prompt-major. Nothing is repeated but the
    [P] positions."""
    cfg = self.config
    rows = cache.batch_size * rounds
    dt = cfg.compute_dtype if dtype is None else (DTYPES[dtype] if isinstance(dtype, str) else dtype)
    v_shape = (rows, cfg.num_key_value_heads, new_length, cfg.head_dim)
    k_shape = (rows, cfg.num_key_value_heads, cfg.head_dim, new_length)  # keys transposed
    if cfg.scan_layers:
      k = jnp.zeros((cfg.num_hidden_layers, *k_shape), dt)
      v = jnp.zeros((cfg.num_hidden_layers, *v_shape), dt)
    else:
      k = tuple(jnp.zeros(k_shape, dt) for _ in range(cfg.num_hidden_layers))
      v = tuple(jnp.zeros(v_shape, dt) for _ in range(cfg.num_hidden_layers))
    return SharedPrefixCache(prefix_k=cache.k, prefix_v=cache.v, prefix_mask=cache.mask,
                             prefix_positions=positions_from_mask(cache.mask), k=k, v=v,
                             index=jnp.zeros((), jnp.int32),
                             positions=jnp.repeat(cache.positions, rounds))

  def _decode_shared(self, token_ids: jax.Array, cache: SharedPrefixCache):
    """token_ids: [N, 1] -> (hidden [N, 1, D], cache advanced by one new slot)."""
    ropes = self._ropes(cache.positions[:, None])
    index = cache.index.astype(jnp.int32)
    masks = cache.attention_masks(self.config.is_sliding, self.config.sliding_window)
    x = self._embed(token_ids)
    if self.config.scan_layers:
      def run_layer(x, layer, sliding, pk, pv, ck, cv, ropes, masks, index):
        cos, sin = _layer_mask(ropes, sliding)
        x, (ck, cv) = layer(x, cos, sin, _layer_mask(masks, sliding), SharedKV(pk, pv, ck, cv),
                            index)
        return x, ck, cv
      x, new_k, new_v = nnx.scan(
          run_layer, in_axes=(nnx.Carry, 0, 0, 0, 0, 0, 0, None, None, None),
          out_axes=(nnx.Carry, 0, 0), transform_metadata=_SCAN_METADATA,
      )(x, self.layers, jnp.asarray(self.config.is_sliding), cache.prefix_k, cache.prefix_v,
        cache.k, cache.v, ropes, masks, index)
    else:
      new_k, new_v = [], []
      for i, layer in enumerate(self.layers):
        kv = SharedKV(cache.prefix_k[i], cache.prefix_v[i], cache.k[i], cache.v[i])
        sliding = self.config.is_sliding[i]
        cos, sin = _layer_mask(ropes, sliding)
        x, (ck, cv) = layer(x, cos, sin, _layer_mask(masks, sliding), kv, index)
        new_k.append(ck)
        new_v.append(cv)
      new_k, new_v = tuple(new_k), tuple(new_v)
    new_cache = dataclasses.replace(cache, k=new_k, v=new_v, index=index + 1,
                                    positions=cache.positions + 1)
    return self.norm(x), new_cache

  def _extend(self, input_ids, attention_mask, cache: KVCache):
    t = input_ids.shape[1]
    s = cache.max_length
    real = attention_mask.astype(bool)
    positions = cache.positions[:, None] + positions_from_mask(attention_mask)
    ropes = self._ropes(positions)
    index = cache.index.astype(jnp.int32)
    slot_mask = jax.lax.dynamic_update_slice(cache.mask, real, (jnp.zeros((), jnp.int32), index))
    q_slot = index + jnp.arange(t)
    k_slot = jnp.arange(s)
    # Each row's tokens fill its slots in order from position 0, so a real slot's position is the
    # number of real slots before it.
    masks = self._masks(slot_mask[:, None, :] & (k_slot[None, None, :] <= q_slot[None, :, None]),
                        (k_slot[None, None, :] == q_slot[None, :, None]), positions,
                        positions_from_mask(slot_mask))
    x = self._embed(input_ids)
    if self.config.scan_layers:
      def run_layer(x, layer, sliding, ck, cv, ropes, masks, index):
        cos, sin = _layer_mask(ropes, sliding)
        x, (ck, cv) = layer(x, cos, sin, _layer_mask(masks, sliding), (ck, cv), index)
        return x, ck, cv
      x, new_k, new_v = nnx.scan(
          run_layer, in_axes=(nnx.Carry, 0, 0, 0, 0, None, None, None),
          out_axes=(nnx.Carry, 0, 0), transform_metadata=_SCAN_METADATA,
      )(x, self.layers, jnp.asarray(self.config.is_sliding), cache.k, cache.v, ropes, masks,
        index)
    else:
      new_k, new_v = [], []
      for i, layer in enumerate(self.layers):
        sliding = self.config.is_sliding[i]
        cos, sin = _layer_mask(ropes, sliding)
        x, (ck, cv) = layer(x, cos, sin, _layer_mask(masks, sliding), (cache.k[i], cache.v[i]),
                            index)
        new_k.append(ck)
        new_v.append(cv)
      new_k, new_v = tuple(new_k), tuple(new_v)
    new_cache = KVCache(k=new_k, v=new_v, mask=slot_mask, index=index + t,
                        positions=cache.positions + real.sum(axis=1, dtype=jnp.int32))
    return self.norm(x), new_cache
