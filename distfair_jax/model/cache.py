"""Decoding state: the KV cache, and the shared-prefix cache of a prompt continued several times."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from distfair_jax.model.llama_config import DTYPES, LlamaConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  """Decoding state (a pytree of arrays; donate it to jit).

  k, v: per layer [B, kv_heads, S, head_dim] (slots contiguous per kv head: a decode step reads them
  without transposing), a tuple of one array per layer, or one array [layers, B, kv_heads, S,
  head_dim] for a model with ``scan_layers``; mask: [B, S] bool, slots holding a real token (left
  padding leaves invalid slots); index: [] int32, next slot to write (shared by all rows);
  positions: [B] int32, RoPE position of each row's next token.
  """

  k: tuple[jax.Array, ...] | jax.Array
  v: tuple[jax.Array, ...] | jax.Array
  mask: jax.Array
  index: jax.Array
  positions: jax.Array

  @property
  def batch_size(self) -> int:
    return self.mask.shape[0]

  @property
  def max_length(self) -> int:
    return self.mask.shape[1]

  @classmethod
  def empty(cls, cfg: LlamaConfig, batch: int, max_length: int, dtype: Any = None) -> KVCache:
    """An empty cache of ``cfg``'s model for ``batch`` rows and ``max_length`` slots (prompt +
    generated tokens); ``dtype`` (default: the compute dtype) a name or a jnp dtype."""
    dt = cfg.compute_dtype if dtype is None else (DTYPES[dtype] if isinstance(dtype, str) else dtype)
    shape = (batch, cfg.num_key_value_heads, max_length, cfg.head_dim)
    n = cfg.num_hidden_layers
    if cfg.scan_layers:
      k, v = jnp.zeros((n, *shape), dt), jnp.zeros((n, *shape), dt)
    else:
      k = tuple(jnp.zeros(shape, dt) for _ in range(n))
      v = tuple(jnp.zeros(shape, dt) for _ in range(n))
    return cls(k=k, v=v, mask=jnp.zeros((batch, max_length), bool), index=jnp.zeros((), jnp.int32),
               positions=jnp.zeros((batch,), jnp.int32))

  def logical_axes(self) -> KVCache:
    """Same structure with a PartitionSpec of logical axis names per leaf (for sharding)."""
    P = jax.sharding.PartitionSpec
    kv = P("batch", "kv_heads", "cache_length", "head_dim")
    if isinstance(self.k, tuple):
      k, v = tuple(kv for _ in self.k), tuple(kv for _ in self.v)
    else:
      k = v = P("layers", *kv)
    return KVCache(k=k, v=v, mask=P("batch", "cache_length"), index=P(), positions=P("batch"))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SharedKV:
  """One layer's keys/values for shared-prefix decoding (what ``Attention`` gets as ``kv_cache``).

  prefix_k, prefix_v: [P, kv_heads, L, head_dim], each prompt's slots once; the new tokens of each
  of the N = P * rounds rows (prompt-major: row p * rounds + r): k [N, kv_heads, head_dim, T] (keys
  transposed), v [N, kv_heads, T, head_dim].
  """

  prefix_k: jax.Array
  prefix_v: jax.Array
  k: jax.Array
  v: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SharedPrefixCache:
  """Decoding state when every prompt is continued ``rounds`` times (``Llama.shared_prefix_cache``).

  prefix_k, prefix_v: per layer [P, kv_heads, L, head_dim] (a tuple, or one array with a leading
  [layers] axis under ``scan_layers``), written by the prefill and only read afterwards;
  prefix_mask: [P, L] bool, slots holding a real prompt token; prefix_positions: [P, L] int32, their
  RoPE positions; k, v: per layer [N, kv_heads, head_dim, T] (keys transposed) and [N, kv_heads,
  T, head_dim], the rows' new tokens (N = P * rounds); index: [] int32, next new slot to write
  (shared by all rows); positions: [N] int32, RoPE position of each row's next token. Rounds of a
  prompt stay at one position (they advance together).
  """

  prefix_k: tuple[jax.Array, ...] | jax.Array
  prefix_v: tuple[jax.Array, ...] | jax.Array
  prefix_mask: jax.Array
  prefix_positions: jax.Array
  k: tuple[jax.Array, ...] | jax.Array
  v: tuple[jax.Array, ...] | jax.Array
  index: jax.Array
  positions: jax.Array

  @property
  def batch_size(self) -> int:
    return self.positions.shape[0]

  @property
  def rounds(self) -> int:
    return self.positions.shape[0] // self.prefix_mask.shape[0]

  @property
  def new_length(self) -> int:
    return self.k.shape[-1] if not isinstance(self.k, tuple) else self.k[0].shape[-1]

  def grow(self, new_length: int) -> SharedPrefixCache:
    """The same cache with ``new_length`` (>= the current) per-row slots, the new ones empty."""
    extra = new_length - self.new_length
    if extra < 0:
      raise ValueError(f"grow: expected at least {self.new_length} slots, got {new_length}")
    if extra == 0:
      return self
    pad_k = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])
    pad_v = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, extra), (0, 0)])
    return dataclasses.replace(self, k=jax.tree.map(pad_k, self.k), v=jax.tree.map(pad_v, self.v))

  def attention_masks(self, is_sliding: tuple[bool, ...], sliding_window: int | None
                      ) -> tuple[tuple[jax.Array, jax.Array], ...]:
    """((prefix [P, L], new [1, T]),) or, with sliding-window layers (``is_sliding``, the
    config's), also the windowed pair; the query of every round of prompt p sits at position
    ``positions[p * rounds]``."""
    index = self.index
    slot = jnp.arange(self.new_length)
    written = (slot <= index)[None, :]
    full = (self.prefix_mask, written)
    if not any(is_sliding):
      return (full,)
    w = sliding_window
    q_pos = self.positions[::self.rounds]  # [P]
    prefix = self.prefix_mask & ((q_pos[:, None] - self.prefix_positions) < w)
    return full, (prefix, written & ((index - slot) < w)[None, :])
