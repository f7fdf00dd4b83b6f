"""Reference log-probs computed before a stage, once per distinct sequence (``hybrid.reference:
cached``, or ``auto`` where that saves compute).

The reference model is frozen, so a sequence's reference log-prob is the same at every step that
holds it, and the sequences repeat: every target recurs once per epoch, and the method's data has
few distinct (question wording, answer) pairs per occupation (about 4% of a gender_real_us stage's
sequences are distinct). ``SequencePool`` walks the stage's global batches in the rows layout on the
host (the same units per step as the training pipeline in either layout: its shuffle and length
grouping do not depend on the layout), keeps each distinct sequence once (keyed by a digest of its
tokens, labels and label mask) and records, per step, which entry each of the step's targets and
mismatched pairs is. ``PooledCache.compute`` runs the reference forward over the pool in
length-sorted chunks (each padded to the pipeline's smallest bucket that holds it), the chunk's
rows split over the processes, and gathers the log-probs on every process; ``attach`` puts a
step's host batch on the mesh with its ``ReferenceLogps`` filled in. Both layouts read the
reference in the rows layout's order, [desirables..., undesirables...] of the global batch, each
process supplying its contiguous block. This is TRL's ``precompute_ref_log_probs`` with
duplicates removed. ``save`` / ``load`` keep a pool's log-probs beside the stage, so a stage resumed
from its checkpoint reads them instead of running the reference again (SmolLM2's gender_real_uk
stage 2: 63 chunks, about 4 minutes on the 2-core CPU, at every resume).

Shapes: an entry is one sequence of n tokens (input_ids, labels [n] int32, label_mask [n]); a chunk
is ``Sequences`` [rows, L]; a step's reference is ``ReferenceLogps`` [B] per field (B rows-layout
sequences of the global batch; this process's block of them on the host).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
from typing import Any, Callable, Iterable
import zipfile

import jax
import numpy as np
from tqdm.auto import tqdm

from distfair_jax import distributed
from distfair_jax import fileio
from distfair_jax import sharding as shd
from distfair_jax.data import batches as B
from distfair_jax.data import tokenize

__all__ = ["SequencePool", "PooledCache", "chunk_rows", "pays", "CACHE_PAYS_BELOW"]

# ``hybrid.reference: auto`` caches when the pool's reference compute is at most this share of the
# steps' own reference passes (a 10% saving at least).
CACHE_PAYS_BELOW = 0.9


def pays(distinct_share: float, step_cost: float = 1.0) -> bool:
  """Whether the pool pays: its compute (the distinct share of the rows-layout sequences) against
  the steps' reference passes, ``step_cost`` of the rows layout's (1 on the rows layout; the
  packed / rows compute ratio on the packed layout, whose pass shares each pair's prompt)."""
  return distinct_share <= CACHE_PAYS_BELOW * step_cost


def _trimmed(seq: B.Sequences, row: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  n = int(np.asarray(seq.attention_mask[row]).sum())
  return (np.asarray(seq.input_ids[row, :n], np.int32), np.asarray(seq.labels[row, :n], np.int32),
          np.asarray(seq.label_mask[row, :n], np.float32))


def _digest(parts: tuple[np.ndarray, ...]) -> bytes:
  h = hashlib.blake2b(digest_size=16)
  for p in parts:
    h.update(np.ascontiguousarray(p).tobytes())
    h.update(b"|")
  return h.digest()


@dataclasses.dataclass
class SequencePool:
  """The distinct sequences of a stage's global rows-layout hybrid batches.

  entries: (input_ids, labels, label_mask), each [n]; steps: step -> (target entries [B],
  mismatched entries [B]); seen: sequences over the pooled steps (2 B per step)."""
  entries: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
  steps: dict[int, tuple[np.ndarray, np.ndarray]]
  seen: int

  @classmethod
  def from_batches(cls, batches: Iterable[tuple[int, B.HybridBatch]]) -> SequencePool:
    index: dict[bytes, int] = {}
    entries: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    steps: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    seen = 0

    def ids(seq: B.Sequences) -> np.ndarray:
      out = np.empty(seq.input_ids.shape[0], np.int64)
      for r in range(out.shape[0]):
        parts = _trimmed(seq, r)
        key = _digest(parts)
        if key not in index:
          index[key] = len(entries)
          entries.append(parts)
        out[r] = index[key]
      return out

    for step, batch in batches:
      if not isinstance(batch, B.HybridBatch):
        raise TypeError(f"SequencePool: expected rows-layout HybridBatch, got {type(batch)}")
      steps[step] = (ids(batch.seq), ids(batch.mismatched))
      seen += 2 * batch.seq.input_ids.shape[0]
    return cls(entries, steps, seen)

  def digest(self) -> bytes:
    """What the pool's log-probs depend on besides the reference: its entries, in order."""
    h = hashlib.blake2b(digest_size=16)
    for entry in self.entries:
      h.update(_digest(entry))
    return h.digest()

  @property
  def distinct_share(self) -> float:
    """Distinct sequences / sequences seen."""
    return len(self.entries) / max(1, self.seen)

  def chunks(self, rows: int, buckets: tuple[int, ...]) -> list[tuple[np.ndarray, int]]:
    """The pool in length-sorted chunks of ``rows`` entries: [(entry ids, padded length)]."""
    order = np.argsort([len(e[0]) for e in self.entries], kind="stable")
    out = []
    for lo in range(0, len(order), rows):
      ids = order[lo:lo + rows]
      out.append((ids, tokenize.bucket_for(max(len(self.entries[i][0]) for i in ids), buckets)))
    return out

  def batch(self, ids: np.ndarray, rows: int, length: int) -> B.Sequences:
    """Entries ``ids`` as right-padded ``Sequences`` [rows, length] (empty rows after them)."""
    arrays = [np.zeros((rows, length), np.int32) for _ in range(3)] + [
        np.zeros((rows, length), np.float32)]
    input_ids, attention, labels, mask = arrays
    for r, i in enumerate(ids):
      tok, lab, m = self.entries[i]
      n = len(tok)
      input_ids[r, :n], attention[r, :n], labels[r, :n], mask[r, :n] = tok, 1, lab, m
    return B.Sequences(input_ids, attention, labels, mask)


@dataclasses.dataclass
class PooledCache:
  """Reference log-probs [entries] of a ``SequencePool`` (the same on every process)."""
  pool: SequencePool
  logps: np.ndarray

  @classmethod
  def compute(cls, pool: SequencePool, seq_logps: Callable[[B.Sequences], jax.Array], *, rows: int,
              buckets: tuple[int, ...], mesh, progress: bool = False,
              desc: str = "reference") -> PooledCache:
    """``seq_logps``: global ``Sequences`` -> sequence log-probs [rows]; ``rows``: global rows per
    chunk (a multiple of the processes and of data x fsdp)."""
    n, k = jax.process_count(), jax.process_index()
    local = rows // n
    logps = np.zeros(len(pool.entries), np.float32)
    for ids, length in tqdm(pool.chunks(rows, buckets), desc=desc, unit="chunk",
                            disable=not progress):
      whole = pool.batch(ids, rows, length)
      mine = jax.tree.map(lambda v: v[k * local:(k + 1) * local], whole)
      out = distributed.gather(seq_logps(shd.put_batch(mine, mesh)))
      logps[ids] = out[:len(ids)]
    return cls(pool, logps)

  def save(self, path: Any) -> None:
    """Writes the log-probs and the pool's digest to ``path`` (.npz, atomically)."""
    buf = io.BytesIO()
    np.savez(buf, digest=np.frombuffer(self.pool.digest(), np.uint8), logps=self.logps)
    fileio.write_bytes(path, buf.getvalue())

  @classmethod
  def load(cls, pool: SequencePool, path: Any) -> PooledCache | None:
    """The log-probs ``save`` wrote for this very pool (same entries, same order); None where
    ``path`` is absent, unreadable or holds another pool's."""
    p = fileio.as_path(path)
    try:
      with np.load(io.BytesIO(p.read_bytes())) as z:
        digest, logps = z["digest"].tobytes(), np.asarray(z["logps"], np.float32)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
      return None
    if digest != pool.digest() or logps.shape != (len(pool.entries),):
      return None
    return cls(pool, logps)

  def reference(self, step: int) -> B.ReferenceLogps:
    """Step ``step``'s reference log-probs: this process's block of the global [B] (host)."""
    targets, mismatched = self.pool.steps.pop(step)
    n, k = jax.process_count(), jax.process_index()
    local = len(targets) // n
    block = slice(k * local, (k + 1) * local)
    return B.ReferenceLogps(self.logps[targets][block], self.logps[mismatched][block])

  def attach(self, step: int, host_batch, mesh):
    """The host batch of step ``step`` on ``mesh`` (``put_batch``), its reference filled in."""
    return shd.put_batch(host_batch.replace(reference=self.reference(step)), mesh)


def chunk_rows(batch_size: int) -> int:
  """Global rows per pool chunk: a rows-layout step's reference pass (targets + mismatched)."""
  return 2 * batch_size
