"""Typed batches: what collation (``data.collate``) produces and the train steps consume.

Every batch is a ``flax.struct.dataclass`` (a pytree) whose array leaves all lead with the batch
axis (``.rows``), so a batch is sharded over the mesh's ``batch`` axes by its logical axes
(``.logical_axes()``, as ``model.llama.KVCache``), split over JAX processes by rows, and passed to
``jax.jit`` whole. Shapes (B
rows, L padded length, K categories; packed rows: R rows of T tokens, G label groups of N labels):

- ``Sequences``: input_ids, attention_mask, labels [B, L] int32; label_mask [B, L] float32
  (``labels[:, t] = input_ids[:, t + 1]``; the mask is 1 on completion labels: steering token,
  answer, end of turn).
- ``Packed``: shared-prefix rows (``collate.pack_shared_prefix``): input_ids, positions,
  segment_ids [R, T] int32; label_source, label_ids, label_branch [R, G, N] int32;
  steering_position [R] int32.
- ``SFTBatch`` (sft, ift): seq, steering_position [B], category [B], target [B, K].
- ``HybridBatch`` (the method, rows layout): targets laid out [desirable_0..P-1,
  undesirable_0..P-1] (B = 2P), the mismatched KTO pairs (row i = prompt i + completion of row
  (i + 1) mod B), steering_position, category, desirable [B], target [B, K].
- ``PackedHybridBatch``: one packed row per pair, [prompt | desirable | undesirable | mismatched of
  the desirable row | mismatched of the undesirable row], labels in two groups (targets, then
  mismatched); target [P, K], category [P].
- ``DPOBatch``: chosen and rejected sequences, category [B], target [B, K];
  ``PackedDPOBatch``: one packed row per record, [prompt | chosen | rejected], one label group.

Hybrid batches carry ``reference`` (``ReferenceLogps``, [B] each, in the rows layout's order) when
the reference log-probs are cached instead of computed in the step. ``abstract`` class methods give
the ``jax.ShapeDtypeStruct`` batch of a stage's worst case, for ``distfair plan``.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from distfair_jax.sharding import batch_logical_axes

__all__ = ["Sequences", "Packed", "ReferenceLogps", "SFTBatch", "HybridBatch", "PackedHybridBatch",
           "DPOBatch", "PackedDPOBatch", "Batch"]

Array = Any  # numpy on the host, jax.Array on devices, ShapeDtypeStruct when abstract


def _sds(shape, dtype) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(shape), dtype)


class _Rows:
  """Every leaf of a batch leads with its rows."""

  @property
  def rows(self) -> int:
    return int(np.shape(jax.tree.leaves(self)[0])[0])

  def logical_axes(self):
    """The same tree with a PartitionSpec of logical axis names per leaf (``batch`` on the rows),
    for ``sharding.logical_shardings``."""
    return batch_logical_axes(self)


@struct.dataclass
class Sequences(_Rows):
  """Right-padded prompt + completion sequences [B, L]."""
  input_ids: Array
  attention_mask: Array
  labels: Array
  label_mask: Array

  @classmethod
  def abstract(cls, rows: int, length: int) -> Sequences:
    i = lambda: _sds((rows, length), jnp.int32)
    return cls(i(), i(), i(), _sds((rows, length), jnp.float32))


@struct.dataclass
class Packed(_Rows):
  """Shared-prefix rows [R, T], labels in G groups [R, G, N]."""
  input_ids: Array
  positions: Array
  segment_ids: Array
  label_source: Array
  label_ids: Array
  label_branch: Array
  steering_position: Array

  @classmethod
  def abstract(cls, rows: int, length: int, groups: int, labels: int) -> Packed:
    t = lambda: _sds((rows, length), jnp.int32)
    g = lambda: _sds((rows, groups, labels), jnp.int32)
    return cls(t(), t(), t(), g(), g(), g(), _sds((rows,), jnp.int32))

  @property
  def groups(self) -> int:
    return self.label_source.shape[1]


@struct.dataclass
class ReferenceLogps(_Rows):
  """The reference model's sequence log-probs [B]: of the targets, and of the mismatched pairs."""
  targets: Array
  mismatched: Array


@struct.dataclass
class SFTBatch(_Rows):
  seq: Sequences
  steering_position: Array
  category: Array
  target: Array

  @classmethod
  def abstract(cls, rows: int, length: int, k: int) -> SFTBatch:
    return cls(Sequences.abstract(rows, length), _sds((rows,), jnp.int32),
               _sds((rows,), jnp.int32), _sds((rows, k), jnp.float32))


@struct.dataclass
class HybridBatch(_Rows):
  seq: Sequences
  mismatched: Sequences
  steering_position: Array
  category: Array
  target: Array
  desirable: Array
  reference: Optional[ReferenceLogps] = None

  @classmethod
  def abstract(cls, rows: int, length: int, k: int, cached: bool) -> HybridBatch:
    ref = ReferenceLogps(_sds((rows,), jnp.float32), _sds((rows,), jnp.float32)) if cached else None
    return cls(Sequences.abstract(rows, length), Sequences.abstract(rows, length),
               _sds((rows,), jnp.int32), _sds((rows,), jnp.int32), _sds((rows, k), jnp.float32),
               _sds((rows,), jnp.int32), ref)


@struct.dataclass
class PackedHybridBatch(_Rows):
  packed: Packed
  target: Array
  category: Array
  reference: Optional[ReferenceLogps] = None

  @classmethod
  def abstract(cls, pairs: int, length: int, k: int, cached: bool) -> PackedHybridBatch:
    """The worst case of pairs whose sequences are ``length`` tokens: a one-token prompt shared by
    four completions (4 x length tokens per row, 2 x length labels per group)."""
    ref = (ReferenceLogps(_sds((2 * pairs,), jnp.float32), _sds((2 * pairs,), jnp.float32))
           if cached else None)
    return cls(Packed.abstract(pairs, 4 * length, 2, 2 * length), _sds((pairs, k), jnp.float32),
               _sds((pairs,), jnp.int32), ref)


@struct.dataclass
class DPOBatch(_Rows):
  chosen: Sequences
  rejected: Sequences
  category: Array
  target: Array

  @classmethod
  def abstract(cls, rows: int, length: int, k: int) -> DPOBatch:
    return cls(Sequences.abstract(rows, length), Sequences.abstract(rows, length),
               _sds((rows,), jnp.int32), _sds((rows, k), jnp.float32))


@struct.dataclass
class PackedDPOBatch(_Rows):
  packed: Packed
  category: Array
  target: Array

  @classmethod
  def abstract(cls, rows: int, length: int, k: int) -> PackedDPOBatch:
    """The worst case: a one-token prompt, then two full completions."""
    return cls(Packed.abstract(rows, 2 * length, 1, 2 * length), _sds((rows,), jnp.int32),
               _sds((rows, k), jnp.float32))


Batch = SFTBatch | HybridBatch | PackedHybridBatch | DPOBatch | PackedDPOBatch
