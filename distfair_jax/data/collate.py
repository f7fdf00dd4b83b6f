"""Collation: encoded examples (``Encoder.encode_record``) -> the typed batches of ``data.batches``.

Rows layout: each sequence is a right-padded row of a length from the buckets (the smallest that fits
every row of the batch, its mismatched / chosen / rejected rows included). Packed layout
(``pack_shared_prefix``): the sequences that share a prompt go in one row after it, so the prompt is
computed once for all of them; KTO packs a pair's four sequences (desirable, undesirable and the two
mismatched ones), DPO a record's chosen and rejected completions.

``batch_rows(kind, batch_size, layout)`` is the one rule for how many rows a global batch of
``batch_size`` sequences has (a packed KTO row holds a pair): the pipeline splits those rows over
the processes and the mesh splits them over data x fsdp.

What differs between the record kinds is read from their registry, ``data.kinds``: the layouts a
kind has, its sequences per row, whether its units are pairs (``record_units`` / ``encode_unit``)
and which of ``COLLATORS`` pads it.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np

from distfair_jax.data import batches as B
from distfair_jax.data import kinds as kinds_lib
from distfair_jax.data.kinds import LAYOUTS, check_layout
from distfair_jax.data.tokenize import (Encoder, bucket_for, packed_bucket,
                                        pair_records)
from distfair_jax.errors import InputError

__all__ = ["LAYOUTS", "COLLATORS", "check_layout", "batch_rows", "sequences_per_row", "collate",
           "record_units", "encode_unit", "tokenize_batch", "pack_sequences",
           "pack_shared_prefix", "rotate", "KTO_PACKED_BRANCHES", "KTO_PACKED_GROUPS"]

# Branches of a packed KTO row and their label groups: targets (with gradient), mismatched (without).
KTO_PACKED_BRANCHES = ("desirable", "undesirable", "mismatched_of_desirable",
                       "mismatched_of_undesirable")
KTO_PACKED_GROUPS = ((0, 1), (2, 3))


def sequences_per_row(kind: str, layout: str) -> int:
  """Sequences (the unit of ``batch_size``) per batch row: a packed KTO row holds a pair."""
  return check_layout(kind, layout).sequences_per_row(layout)


def batch_rows(kind: str, batch_size: int, layout: str) -> int:
  """Rows of a global batch of ``batch_size`` sequences."""
  return batch_size // sequences_per_row(kind, layout)


# ------------------------------------------------------------------------------------------------
# Padding into arrays


def pack_sequences(prompts: Sequence[list[int]], completions: Sequence[list[int]], length: int,
                   pad_id: int) -> tuple[B.Sequences, np.ndarray]:
  """Right-padded prompt + completion rows of ``length`` -> (Sequences, steering_position [B]
  int32: the index of the last prompt token, whose logits predict the first completion token)."""
  b = len(prompts)
  input_ids = np.full((b, length), pad_id, np.int32)
  attention_mask = np.zeros((b, length), np.int32)
  labels = np.full((b, length), pad_id, np.int32)
  label_mask = np.zeros((b, length), np.float32)
  steering_position = np.zeros((b,), np.int32)
  for i, (p, c) in enumerate(zip(prompts, completions)):
    seq = list(p) + list(c)
    n = len(seq)
    if n > length:
      raise InputError(f"batch: length: expected at most {length} tokens, got {n}")
    input_ids[i, :n] = seq
    attention_mask[i, :n] = 1
    labels[i, :n - 1] = seq[1:]
    label_mask[i, len(p) - 1:n - 1] = 1.0
    steering_position[i] = len(p) - 1
  return B.Sequences(input_ids, attention_mask, labels, label_mask), steering_position


def _pack_row(out: dict[str, np.ndarray], i: int, p: list[int], comps: Sequence[list[int]],
              groups: Sequence[Sequence[int]]) -> None:
  n_p = len(p)
  out["input_ids"][i, :n_p] = p
  out["positions"][i, :n_p] = np.arange(n_p)
  out["segment_ids"][i, :n_p] = 1
  out["steering_position"][i] = n_p - 1
  starts, at = [], n_p
  for c, comp in enumerate(comps):
    n = len(comp)
    starts.append(at)
    out["input_ids"][i, at:at + n] = comp
    out["positions"][i, at:at + n] = np.arange(n_p, n_p + n)
    out["segment_ids"][i, at:at + n] = 2 + c
    at += n
  for g, members in enumerate(groups):
    lab = 0
    for c in members:
      comp, at = comps[c], starts[c]
      n = len(comp)
      if not n:
        continue
      out["label_source"][i, g, lab:lab + n] = [n_p - 1] + list(range(at, at + n - 1))
      out["label_ids"][i, g, lab:lab + n] = comp
      out["label_branch"][i, g, lab:lab + n] = c
      lab += n


def pack_shared_prefix(prompts: Sequence[list[int]], branches: Sequence[Sequence[list[int]]],
                       length: int, label_length: int, pad_id: int,
                       groups: Sequence[Sequence[int]] | None = None) -> B.Packed:
  """One row per prompt: [prompt | branch_0 | ... | branch_{C-1} | pad] (shared-prefix packing).

  Every branch is a completion of the row's prompt; the model sees each one as the sequence
  prompt + branch (``Llama.__call__`` with ``segment_ids`` and ``positions``), so the prompt is
  computed once for C sequences. The labels (every completion token, as in ``pack_sequences``) are
  laid out in G groups of branches (``groups``, default one group of all C branches), so that a
  caller can treat one group differently (e.g. without gradient). Returns ``Packed`` with (R rows,
  T = ``length``, N = ``label_length``): input_ids [R, T] (pad id in padding), positions [R, T]
  (prompt 0..p-1; each branch continues from p), segment_ids [R, T] (0 pad, 1 prompt, 2 + c for
  branch c), label_source [R, G, N] (the index in the row of the hidden state that predicts each
  label: the previous token of the branch, or the last prompt token for a branch's first token),
  label_ids [R, G, N] (the completion tokens, pad id in padding), label_branch [R, G, N] (the branch
  c of each label, -1 in padding), steering_position [R] (p - 1).
  """
  r = len(prompts)
  groups = [list(g) for g in (groups or [range(len(branches[0]) if branches else 0)])]
  g_n = len(groups)
  out = {"input_ids": np.full((r, length), pad_id, np.int32),
         "positions": np.zeros((r, length), np.int32),
         "segment_ids": np.zeros((r, length), np.int32),
         "label_source": np.zeros((r, g_n, label_length), np.int32),
         "label_ids": np.full((r, g_n, label_length), pad_id, np.int32),
         "label_branch": np.full((r, g_n, label_length), -1, np.int32),
         "steering_position": np.zeros((r,), np.int32)}
  for i, (p, comps) in enumerate(zip(prompts, branches)):
    n_tokens = len(p) + sum(len(c) for c in comps)
    n_labels = max(sum(len(comps[c]) for c in g) for g in groups)
    if n_tokens > length or n_labels > label_length:
      raise InputError(f"batch: length: expected a packed row of at most {length} tokens and "
                       f"{label_length} labels per group, got {n_tokens} and {n_labels}")
    _pack_row(out, i, p, comps, groups)
  return B.Packed(**out)


def rotate(items: Sequence[Any], shift: int = 1) -> list[Any]:
  """items[(i + shift) mod n] at position i (the KTO mismatched completions: shift 1)."""
  n = len(items)
  return [items[(i + shift) % n] for i in range(n)]


# ------------------------------------------------------------------------------------------------
# Batches


def _meta(rows: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
  """(category [B] int32, target [B, K] float32)."""
  return (np.asarray([r["category"] for r in rows], np.int32),
          np.stack([r["target"] for r in rows]).astype(np.float32))


def _label_buckets(buckets: Sequence[int]) -> tuple[int, ...]:
  return tuple(sorted({16, *buckets}))


def _collate_sft(rows, encoder: Encoder, buckets, layout: str = "rows",
                 kl_pairs: str = "shifted") -> B.SFTBatch:
  del layout, kl_pairs  # rows only; no mismatched pairs
  rows = list(rows)
  prompts = [r["prompt"] for r in rows]
  completions = [encoder.fit(p, r["completion"]) for p, r in zip(prompts, rows)]
  length = bucket_for(max(len(p) + len(c) for p, c in zip(prompts, completions)), buckets)
  seq, steer = pack_sequences(prompts, completions, length, encoder.pad_id)
  return B.SFTBatch(seq, steer, *_meta(rows))


KL_PAIRS = ("shifted", "reference")


def mismatched_rows(rows: Sequence[Any], kl_pairs: str = "shifted") -> list[Any]:
  """The rows whose completions pair with each row's prompt for KTO's z0.

  rows: [d_0..d_{P-1}, u_0..u_{P-1}] (desirables, then undesirables). ``shifted``: row i + 1
  (``rotate``). ``reference``: the original's interleaved order [d0, u0, d1, u1, ...] shifted by
  one: d_i -> u_i (its own prompt's undesirable), u_i -> d_{i+1}.
  """
  if kl_pairs == "shifted":
    return rotate(rows)
  if kl_pairs != "reference":
    raise InputError(f"hybrid.kl_pairs: expected one of {', '.join(KL_PAIRS)}, got {kl_pairs!r}")
  p = len(rows) // 2
  return [rows[p + i] for i in range(p)] + [rows[(i + 1) % p] for i in range(p)]


def _collate_kto(pairs, encoder: Encoder, buckets, layout: str, kl_pairs: str = "shifted"):
  rows = [pair[0] for pair in pairs] + [pair[1] for pair in pairs]
  if len(rows) < 2:
    raise InputError("batch: size: expected at least 2 rows for KTO mismatched pairs, got 1")
  prompts = [r["prompt"] for r in rows]
  completions = [encoder.fit(p, r["completion"]) for p, r in zip(prompts, rows)]
  mismatched = [encoder.fit(p, r["completion"])
                for p, r in zip(prompts, mismatched_rows(rows, kl_pairs))]
  category, target = _meta(rows)
  if layout == "packed":
    p = len(pairs)
    branches = [(completions[i], completions[p + i], mismatched[i], mismatched[p + i])
                for i in range(p)]
    n_tokens = max(len(prompts[i]) + sum(len(c) for c in b) for i, b in enumerate(branches))
    n_labels = max(max(len(b[0]) + len(b[1]), len(b[2]) + len(b[3])) for b in branches)
    packed = pack_shared_prefix(prompts[:p], branches, packed_bucket(n_tokens, buckets),
                                packed_bucket(n_labels, _label_buckets(buckets)), encoder.pad_id,
                                groups=KTO_PACKED_GROUPS)
    return B.PackedHybridBatch(packed, target[:p], category[:p])
  length = bucket_for(max(len(q) + max(len(c), len(m))
                          for q, c, m in zip(prompts, completions, mismatched)), buckets)
  seq, steer = pack_sequences(prompts, completions, length, encoder.pad_id)
  kl, _ = pack_sequences(prompts, mismatched, length, encoder.pad_id)
  desirable = np.asarray([r["desirable"] for r in rows], np.int32)
  return B.HybridBatch(seq, kl, steer, category, target, desirable)


def _collate_dpo(rows, encoder: Encoder, buckets, layout: str, kl_pairs: str = "shifted"):
  del kl_pairs  # no mismatched pairs
  rows = list(rows)
  prompts = [r["prompt"] for r in rows]
  chosen = [encoder.fit(p, r["chosen"]) for p, r in zip(prompts, rows)]
  rejected = [encoder.fit(p, r["rejected"]) for p, r in zip(prompts, rows)]
  category, target = _meta(rows)
  if layout == "packed":  # one row per record: [prompt | chosen | rejected]
    n_tokens = max(len(p) + len(c) + len(r) for p, c, r in zip(prompts, chosen, rejected))
    n_labels = max(len(c) + len(r) for c, r in zip(chosen, rejected))
    packed = pack_shared_prefix(prompts, list(zip(chosen, rejected)),
                                packed_bucket(n_tokens, buckets),
                                packed_bucket(n_labels, _label_buckets(buckets)), encoder.pad_id,
                                groups=((0, 1),))
    return B.PackedDPOBatch(packed, category, target)
  length = bucket_for(max(len(p) + max(len(c), len(r)) for p, c, r in
                          zip(prompts, chosen, rejected)), buckets)
  return B.DPOBatch(pack_sequences(prompts, chosen, length, encoder.pad_id)[0],
                    pack_sequences(prompts, rejected, length, encoder.pad_id)[0], category, target)


# Each kind's collator (``data.kinds.RecordKind.batch``): encoded examples -> its typed batch.
COLLATORS: dict[str, Callable[..., B.Batch]] = {
    "sft": _collate_sft, "kto": _collate_kto, "dpo": _collate_dpo}


def record_units(records: Sequence[Mapping[str, Any]], kind: str) -> list[Any]:
  """The units of ``records`` that are shuffled and collated: each record, or for a paired kind
  (kto) each (desirable, undesirable) pair (``tokenize.pair_records``: in file order)."""
  return pair_records(records) if kinds_lib.get(kind).paired else list(records)


def encode_unit(encoder: Encoder, unit: Any, kind: str) -> Any:
  """One unit (``record_units``) -> its example for ``collate``: ``Encoder.encode_record`` of the
  record, or for a paired kind the tuple of both records' encodings."""
  if kinds_lib.get(kind).paired:
    return tuple(encoder.encode_record(r, kind) for r in unit)
  return encoder.encode_record(unit, kind)


def collate(examples: Sequence[Any], kind: str, encoder: Encoder,
            buckets: Sequence[int] | None = None, layout: str = "rows",
            kl_pairs: str = "shifted") -> B.Batch:
  """Pads encoded examples into one typed batch of ``kind`` (see ``data.batches``).

  sft / ift: ``SFTBatch``. kto: the examples are (desirable, undesirable) pairs; rows layout,
  ``HybridBatch`` of B = 2 * pairs rows [desirables; undesirables] plus the mismatched pairs (row
  i's prompt with the completion of row (i + 1) mod B; B >= 2); packed layout,
  ``PackedHybridBatch``, the pair's four sequences in one row after their shared prompt, with the
  desirable example's target and category; ``kl_pairs`` picks the mismatched pairs
  (``mismatched_rows``). dpo: ``DPOBatch``, or ``PackedDPOBatch`` with one row
  per record, [prompt | chosen | rejected].
  """
  spec = check_layout(kind, layout)
  if not examples:
    raise InputError("batch: size: expected at least one example, got none")
  buckets = tuple(buckets or encoder.buckets)
  return COLLATORS[spec.batch](examples, encoder, buckets, layout, kl_pairs)


def tokenize_batch(records: Sequence[Mapping[str, Any]], tokenizer, kind: str, *,
                   encoder: Encoder | None = None, layout: str = "rows",
                   **encoder_kwargs) -> B.Batch:
  """One padded batch from records (KTO: in file order, desirable then undesirable per pair)."""
  encoder = encoder or Encoder(tokenizer, **encoder_kwargs)
  examples = [encode_unit(encoder, unit, kind) for unit in record_units(records, kind)]
  return collate(examples, kind, encoder, layout=layout)
