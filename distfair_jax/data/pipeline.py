"""grain pipelines: seeded shuffle per epoch, tokenize, bucketed padding, batch, shard by process.

    batches = make_batches(records, encoder, "kto", batch_size=8, seed=0, num_epochs=3)
    batches.steps_per_epoch, batches.num_steps        # global steps
    it = batches.iterator()                           # grain DatasetIterator
    batch = next(it)                                  # a data.batches struct (this process's rows)
    state = it.get_state()                            # JSON-able dict, e.g. {"next_index": 17}
    it = batches.iterator(state)                      # resumes exactly where ``state`` was taken

How it is built (``grain.MapDataset``): ``source(units).map(encode).shuffle(seed)
.batch(units_per_batch, batch_fn=collate).repeat(num_epochs).map(shard)``. A unit is one record
(sft, ift, dpo) or one (desirable, undesirable) pair (kto: pairs are shuffled as units). The shuffle
is reseeded each epoch (grain folds the epoch into the seed) and batches never straddle epochs.

``batch_size`` is the GLOBAL batch (rows; KTO: 2 x pairs, even, >= 2). Every process builds the same
global batch, so the padded length (the smallest of ``encoder.buckets`` that fits the
longest row, KL / chosen / rejected rows included) and the KTO mismatched pairs (row i with the
completion of row (i + 1) mod B) are those of the global batch; then process ``p`` of ``S`` keeps
rows ``[p * B / S, (p + 1) * B / S)``. Concatenating the processes' batches in process order gives
the global batch (what ``jax.make_array_from_process_local_data`` expects). By default
``shard_index, shard_count = jax.process_index(), jax.process_count()``.

Batches are the typed structs of ``data.batches`` (``data.collate.collate``), with
``collate.batch_rows(kind, batch_size, layout) / shard_count`` rows on each process (a packed KTO
row holds a pair).

``group_by_length=True`` (``data.group_by_length``) replaces the plain shuffle with a
length-grouped one (``length_grouped_batches``, as Hugging Face's ``group_by_length``): each batch
holds units of similar length, so a few long rows (stories among one-word answers) do not pad every
batch to their length; the batches' order stays random and a function of (seed, epoch).

``steps_per_epoch(num_records, kind, batch_size)`` is computable without a tokenizer.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, Sequence

import grain
import jax
import numpy as np

from distfair_jax.data import collate as collate_lib
from distfair_jax.data import kinds
from distfair_jax.data import tokenize as tokenize_lib
from distfair_jax.errors import InputError


def _units_per_batch(kind: str, batch_size: int) -> int:
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise InputError(f"pipeline: batch_size: expected a positive integer, got {batch_size!r}")
  pair = kinds.get(kind).records_per_unit
  if pair > 1 and (batch_size < 2 or batch_size % 2):
    raise InputError(f"pipeline: batch_size: expected an even {kind.upper()} batch >= 2 "
                     f"(desirable and undesirable side by side; a batch of one has no mismatched "
                     f"pair), got {batch_size}")
  return batch_size // pair


def num_units(num_records: int, kind: str) -> int:
  """Shuffle units: records, or (desirable, undesirable) pairs for a paired kind (kto)."""
  return num_records // kinds.get(kind).records_per_unit


def unit_length(unit, kind: str) -> int:
  """Tokens of one encoded unit (``collate.encode_unit``; kto: the pair): prompt and every
  completion, what its padded row has to hold."""
  spec = kinds.get(kind)
  examples = unit if spec.paired else (unit,)
  return sum(len(e["prompt"]) + sum(len(e[key]) for key, _ in spec.completions)
             for e in examples)


def length_grouped_batches(lengths: Sequence[int], per: int, *, seed: int, epoch: int,
                           drop_remainder: bool = True, window: int = 50) -> list[np.ndarray]:
  """One epoch's batches of unit indices, grouped by length.

  lengths: [units] token counts; per: units per batch. The units are shuffled (seeded by
  ``(seed, epoch)``), every ``window`` batches' worth is sorted by length (longest first) and cut
  into batches, and the batches are shuffled: each batch holds units of similar length while
  which units share a batch, and the batches' order, stay random. ``drop_remainder`` drops the
  epoch's one partial batch (the shortest units of the last window). -> [steps] arrays of
  ``per`` (the last possibly fewer) indices.
  """
  rng = np.random.default_rng([seed, epoch])
  order = rng.permutation(len(lengths))
  lengths = np.asarray(lengths)
  batches = []
  for lo in range(0, len(order), per * window):
    chunk = order[lo:lo + per * window]
    chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
    batches.extend(chunk[i:i + per] for i in range(0, len(chunk), per))
  if batches and len(batches[-1]) < per and drop_remainder:
    batches.pop()
  return [batches[i] for i in rng.permutation(len(batches))]


def steps_per_epoch(num_records: int, kind: str, batch_size: int, *,
                    drop_remainder: bool = True) -> int:
  """Global optimizer steps per epoch for ``num_records`` records of ``kind``."""
  units, per = num_units(num_records, kind), _units_per_batch(kind, batch_size)
  return units // per if drop_remainder else math.ceil(units / per)


@dataclasses.dataclass
class BatchPipeline:
  """Batches of one process: ``dataset[i]`` is global step i's local batch."""
  dataset: grain.MapDataset
  steps_per_epoch: int
  num_epochs: int | None
  batch_size: int
  shard_index: int
  shard_count: int
  encoder: tokenize_lib.Encoder
  read_options: grain.ReadOptions

  @property
  def num_steps(self) -> int:
    """Total steps (sys.maxsize when repeating forever)."""
    return len(self.dataset)

  def __len__(self) -> int:
    return self.num_steps

  def iterator(self, state: Mapping[str, Any] | None = None) -> grain.DatasetIterator:
    """A checkpointable iterator; ``state`` from ``it.get_state()`` resumes exactly there."""
    it = self.dataset.to_iter_dataset(self.read_options).__iter__()
    if state is not None:
      it.set_state(dict(state))
    return it

  def __iter__(self):
    return self.iterator()


def _check_sharding(kind: str, batch_size: int, layout: str, shard_index: int, shard_count: int,
                    drop_remainder: bool) -> int:
  """-> rows of a global batch, after checking that they split over the processes."""
  if not (isinstance(shard_count, int) and shard_count >= 1 and 0 <= shard_index < shard_count):
    raise InputError(f"pipeline: shard_index: expected 0 <= shard_index < shard_count, got "
                     f"{shard_index} of {shard_count}")
  rows = collate_lib.batch_rows(kind, batch_size, layout)
  if rows % shard_count:
    twice, why = (("2 x ", " (packed layout: one row per pair)") if rows != batch_size
                  else ("", ""))
    raise InputError(f"pipeline: batch_size: expected {twice}a multiple of the {shard_count} "
                     f"processes{why}, got {batch_size}")
  if shard_count > 1 and not drop_remainder:
    raise InputError("pipeline: drop_remainder: expected True when sharding over processes "
                     "(every process needs a full batch), got False")
  return rows


def make_batches(records: Sequence[Mapping[str, Any]], encoder: tokenize_lib.Encoder, kind: str,
                 batch_size: int, *, seed: int, num_epochs: int | None = 1,
                 shard_index: int | None = None, shard_count: int | None = None,
                 drop_remainder: bool = True, buckets: Sequence[int] | None = None,
                 layout: str = "rows", read_options: grain.ReadOptions | None = None,
                 kl_pairs: str = "shifted", group_by_length: bool = False
                 ) -> BatchPipeline:
  """A grain pipeline of padded typed batches (see the module docstring).

  Args:
    records: validated records of ``kind`` (kto: file order, desirable then undesirable per pair).
    encoder: the run's ``data.tokenize.Encoder`` (tokenizer, template, length policy).
    kind: a record kind of ``data.kinds`` (sft | kto | ift | dpo).
    batch_size: global batch size in sequences (kto: 2 x pairs).
    seed: shuffle seed (0 <= seed < 2**32).
    num_epochs: passes over the data (None: forever).
    shard_index, shard_count: this process's slice of each global batch (default: JAX processes).
    drop_remainder: drop each epoch's last partial batch (must be True when shard_count > 1).
    buckets: padded lengths (default ``encoder.buckets``).
    layout: ``rows`` or (kto, dpo) ``packed`` (``data.collate``); a packed KTO row holds a pair,
      and the pairs are split over the processes.
    read_options: grain read options (default: 1 thread, prefetch 4 batches).
    kl_pairs: (kto) the mismatched pairs, ``shifted`` or ``reference`` (``collate.mismatched_rows``).
    group_by_length: batches of units of similar length (``length_grouped_batches``; the units
      are tokenized once up front to know their lengths) instead of the plain shuffle.
  """
  collate_lib.check_layout(kind, layout)
  per = _units_per_batch(kind, batch_size)
  if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
    raise InputError(f"pipeline: seed: expected an integer in [0, 2**32), got {seed!r}")
  if num_epochs is not None and (not isinstance(num_epochs, int) or num_epochs < 1):
    raise InputError(f"pipeline: num_epochs: expected a positive integer or None, "
                     f"got {num_epochs!r}")
  shard_index = jax.process_index() if shard_index is None else shard_index
  shard_count = jax.process_count() if shard_count is None else shard_count
  rows = _check_sharding(kind, batch_size, layout, shard_index, shard_count, drop_remainder)
  units = collate_lib.record_units(records, kind)
  if len(units) < per if drop_remainder else not units:
    raise InputError(f"pipeline: records: expected at least one full batch "
                     f"({per} {'pairs' if kinds.get(kind).paired else 'records'}), "
                     f"got {len(units)}")
  bucket_list = tuple(buckets or encoder.buckets)
  encode = functools.partial(collate_lib.encode_unit, encoder, kind=kind)
  collate = lambda examples: collate_lib.collate(examples, kind, encoder, bucket_list, layout,
                                                 kl_pairs)
  local = rows // shard_count

  def shard(batch):
    if shard_count == 1:
      return batch
    lo = shard_index * local
    return jax.tree.map(lambda v: v[lo:lo + local], batch)

  if group_by_length:
    encoded = [encode(u) for u in units]
    lengths = [unit_length(u, kind) for u in encoded]
    epoch_steps = len(units) // per if drop_remainder else math.ceil(len(units) / per)

    @functools.lru_cache(maxsize=2)
    def plan(epoch: int) -> list[np.ndarray]:
      return length_grouped_batches(lengths, per, seed=seed, epoch=epoch,
                                    drop_remainder=drop_remainder)

    ds = (grain.MapDataset.range(epoch_steps).repeat(num_epochs)
          .map_with_index(lambda i, b: collate([encoded[j] for j in plan(i // epoch_steps)[b]])))
  else:
    ds = (grain.MapDataset.source(units).map(encode).shuffle(seed=seed)
          .batch(per, drop_remainder=drop_remainder, batch_fn=collate))
    epoch_steps = len(ds)
    ds = ds.repeat(num_epochs)
  ds = ds.map(shard)
  return BatchPipeline(ds, epoch_steps, num_epochs, batch_size, shard_index, shard_count, encoder,
                       read_options or grain.ReadOptions(num_threads=1, prefetch_buffer_size=4))
