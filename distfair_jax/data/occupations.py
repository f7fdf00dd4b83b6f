"""Occupation statistics shipped as package data (US BLS CPS, UK ONS ASHE) and user CSV tables.

A table is a CSV file whose leading ``#`` lines are comments (source and unit), then a header row.
Required columns: ``occupation``; ``sector``, ``male`` and ``female`` are optional for user tables
(the built-in ones have all four). Counts are non-negative numbers; ``male + female > 0``.

    table = load_table("us")                  # or "uk", or a path to a CSV file
    table.real_gender_target("Registered nurses")   # -> array([404/2817, 2413/2817])
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
from importlib import resources

import numpy as np

from distfair_jax import fileio
from distfair_jax.errors import InputError

BUILTIN_TABLES: dict[str, str] = {"us": "occupations_us.csv", "uk": "occupations_uk.csv"}
REGIONS: dict[str, str] = {"us": "the US", "uk": "the UK"}


@dataclasses.dataclass(frozen=True)
class Occupation:
  """One row of an occupation table; ``male``/``female`` are counts (None if the table has none)."""
  name: str
  sector: str = ""
  male: float | None = None
  female: float | None = None


@dataclasses.dataclass(frozen=True)
class OccupationTable:
  """An ordered table of occupations read from ``source`` (a file path or ``builtin:us``)."""
  source: str
  occupations: tuple[Occupation, ...]
  comment: str = ""

  @property
  def names(self) -> list[str]:
    return [o.name for o in self.occupations]

  def __len__(self) -> int:
    return len(self.occupations)

  def get(self, name: str, *, where: str = "") -> Occupation:
    for o in self.occupations:
      if o.name == name:
        return o
    raise InputError(f"{where or self.source}: occupation: expected one of the {len(self)} "
                     f"occupations of {self.source}, got {name!r}")

  def real_gender_target(self, name: str) -> np.ndarray:
    """[2] float64: (male, female) / (male + female) for occupation ``name``."""
    o = self.get(name)
    if o.male is None or o.female is None:
      raise InputError(f"{self.source}: male/female: expected counts for real targets, "
                       f"got none for {name!r}")
    total = o.male + o.female
    return np.array([o.male / total, o.female / total], dtype=np.float64)


def _read_text(path: str) -> str:
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise InputError(f"{path}: file: expected a readable file, got {e.strerror}") from None
  if fileio.is_lfs_pointer(raw[:64]) and len(raw) <= 1024:
    raise fileio.lfs_pointer_error(path)
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise InputError(f"{path}: encoding: expected UTF-8 text, got an invalid byte at offset "
                     f"{e.start}") from None
  if not text.strip():
    raise InputError(f"{path}: file: expected a non-empty file, got an empty one")
  return text


def _parse_count(value: str, path: str, line: int, field: str) -> float:
  try:
    x = float(value)
  except (TypeError, ValueError):
    raise InputError(f"{path}: line {line}: {field}: expected a non-negative number, "
                     f"got {value!r}") from None
  if not math.isfinite(x) or x < 0:
    raise InputError(f"{path}: line {line}: {field}: expected a non-negative number, got {value!r}")
  return x


def parse_table(text: str, source: str, *, require_counts: bool = False) -> OccupationTable:
  """Parses CSV ``text`` (``#`` comment lines first, then a header row) into a table."""
  lines = text.splitlines()
  comment_lines, first = [], 0
  while first < len(lines) and (lines[first].startswith("#") or not lines[first].strip()):
    if lines[first].startswith("#"):
      comment_lines.append(lines[first][1:].strip())
    first += 1
  if first >= len(lines):
    raise InputError(f"{source}: header: expected a CSV header row, got only comments")
  reader = csv.reader(io.StringIO("\n".join(lines[first:])))
  header = [h.strip() for h in next(reader)]
  header_line = first + 1
  if "occupation" not in header:
    raise InputError(f"{source}: line {header_line}: occupation: expected a column named "
                     f"'occupation', got none")
  has_counts = "male" in header or "female" in header
  if require_counts or has_counts:
    for col in ("male", "female"):
      if col not in header:
        raise InputError(f"{source}: line {header_line}: {col}: expected a column named "
                         f"{col!r}, got none")
  col = {h: i for i, h in enumerate(header)}
  occupations: list[Occupation] = []
  seen: set[str] = set()
  for offset, row in enumerate(reader):
    line = header_line + 1 + offset
    if not row or all(not c.strip() for c in row):
      continue
    if len(row) != len(header):
      raise InputError(f"{source}: line {line}: row: expected {len(header)} fields "
                       f"({', '.join(header)}), got {len(row)}")
    name = row[col["occupation"]].strip()
    if not name:
      raise InputError(f"{source}: line {line}: occupation: expected a name, got an empty field")
    if name in seen:
      raise InputError(f"{source}: line {line}: occupation: expected unique names, got "
                       f"{name!r} twice")
    seen.add(name)
    sector = row[col["sector"]].strip() if "sector" in col else ""
    male = female = None
    if has_counts:
      male = _parse_count(row[col["male"]], source, line, "male")
      female = _parse_count(row[col["female"]], source, line, "female")
      if male + female <= 0:
        raise InputError(f"{source}: line {line}: male/female: expected a positive total, got 0")
    occupations.append(Occupation(name, sector, male, female))
  if not occupations:
    raise InputError(f"{source}: rows: expected at least one occupation, got none")
  return OccupationTable(source, tuple(occupations), " ".join(comment_lines))


def load_table(name_or_path: str | os.PathLike) -> OccupationTable:
  """Loads a built-in table (``"us"``, ``"uk"``) or a CSV file (see the module docstring)."""
  key = str(name_or_path)
  if key.lower() in BUILTIN_TABLES:
    text = (resources.files("distfair_jax.data") / "resources" /
            BUILTIN_TABLES[key.lower()]).read_text(encoding="utf-8")
    return parse_table(text, f"builtin:{key.lower()}", require_counts=True)
  if not os.path.exists(key):
    raise InputError(f"{key}: occupations: expected 'us', 'uk' or an existing CSV file, "
                     f"got {key!r}")
  return parse_table(_read_text(key), key)
