"""The record kinds, one registry: a new kind is one ``RecordKind`` entry in ``KINDS`` (and, for a
new batch shape, its collator in ``data.collate.COLLATORS``).

Each entry holds what the data modules dispatch on, so none of them compares kind names:

- ``fields``: the fields every record of the kind has (``data.build.validate_record``);
- ``steered``: the prompt stops where the steering token goes and each completion starts with it
  (``Encoder.steered_prompt_ids`` / ``completion_ids``), and the encoded example's ``desirable`` is
  read from the record's ``status``;
- ``completions``: (encoded key, record field) of each completion (``Encoder.encode_record``);
- ``paired``: records come as (desirable, undesirable) pairs with the same prompt, the unit that
  is shuffled and collated (``data.pipeline``; ``batch_size`` counts both);
- ``batch``: the collator, the key of ``data.collate.COLLATORS`` (sft and ift share one);
- ``packed``: sequences (the unit of ``batch_size``) per row of the packed layout, 0 where the kind
  has the rows layout only (``data.collate.sequences_per_row``).

This module imports nothing of the package but its errors: every data module may read it.
"""

from __future__ import annotations

import dataclasses

from distfair_jax.errors import InputError

__all__ = ["RecordKind", "KINDS", "LAYOUTS", "get", "check_layout"]

LAYOUTS = ("rows", "packed")

_STEERED_FIELDS = ("prompt", "occupation", "category", "steering_token", "response", "target",
                   "status")


@dataclasses.dataclass(frozen=True)
class RecordKind:
  """One kind of training record (see the module docstring for each field)."""
  name: str
  fields: tuple[str, ...]
  steered: bool
  batch: str
  completions: tuple[tuple[str, str], ...] = (("completion", "response"),)
  paired: bool = False
  packed: int = 0

  @property
  def records_per_unit(self) -> int:
    """Records per shuffle unit: 2 for (desirable, undesirable) pairs, else 1."""
    return 2 if self.paired else 1

  def sequences_per_row(self, layout: str) -> int:
    """Sequences per batch row: 1 on the rows layout, ``packed`` on the packed one."""
    return self.packed if layout == "packed" else 1


KINDS: dict[str, RecordKind] = {k.name: k for k in (
    RecordKind("sft", _STEERED_FIELDS, steered=True, batch="sft"),
    RecordKind("kto", _STEERED_FIELDS, steered=True, batch="kto", paired=True, packed=2),
    RecordKind("ift", ("prompt", "occupation", "category", "response", "target"), steered=False,
               batch="sft"),
    RecordKind("dpo", ("prompt", "occupation", "category", "chosen", "rejected", "target"),
               steered=False, batch="dpo", completions=(("chosen", "chosen"),
                                                        ("rejected", "rejected")), packed=1),
)}


def get(kind: str, where: str = "batch") -> RecordKind:
  """The entry of ``kind``; InputError naming ``where`` for an unknown one."""
  spec = KINDS.get(kind)
  if spec is None:
    raise InputError(f"{where}: kind: expected one of {', '.join(KINDS)}, got {kind!r}")
  return spec


def check_layout(kind: str, layout: str) -> RecordKind:
  """The entry of ``kind`` after checking that it has ``layout`` (rows, or packed where
  ``packed``)."""
  spec = get(kind)
  if layout not in LAYOUTS or (layout == "packed" and not spec.packed):
    packable = " and ".join(k.name for k in KINDS.values() if k.packed)
    raise InputError(f"batch: layout: expected rows (or packed for {packable}), got {layout!r} "
                     f"for {kind}")
  return spec
