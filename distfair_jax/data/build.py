"""Dataset builders: records for SFT, KTO, IFT, DPO and the test sets; JSONL I/O and validation.

The six built-in datasets: ``gender_real_uk``, ``gender_real_us``, ``gender_even_uk``,
``gender_even_us``, ``race_even_us``, ``sentiment_even_us``. A user dataset is a YAML file::

  name: age_even_us
  attribute: {name: age, categories: [{name: young, answer: Young}, {name: old, answer: Old}]}
  occupations: us                 # us | uk | a CSV file (column occupation) | relative paths ok
  select: [Registered nurses]     # optional subset of the table, in this order
  region: the US                  # default: from us / uk; required for a CSV
  targets: uniform                # uniform | real (gender-like, 2 categories, counts needed)
                                  # | {occupation: [p_0, ..., p_K-1]} | a CSV (occupation, one
                                  #   column per category name, probabilities)
  templates: {train: [...], v1: [...], v2: "...", v3: "..."}   # optional (see data.templates)

Records are plain dicts with public field names (one JSONL file per kind):

  sft.jsonl   prompt, occupation, category, steering_token, response, target, status="desirable"
  kto.jsonl   the same, each desirable row followed by its undesirable row (status="undesirable":
              the same steering token, another category's answer; response_category names it)
  ift.jsonl   prompt, occupation, category, response, target               (no steering token)
  dpo.jsonl   prompt, occupation, category, chosen, rejected, target, rejected_category
  test_v1.jsonl / test_v2.jsonl / test_v3.jsonl   prompt, occupation, version, target, pe_prompt
  manifest.json   dataset, seed, counts, template version, options

Per occupation, the N rows' categories follow the target p exactly up to rounding (largest-remainder
allocation). ``build_dataset(name_or_spec)`` returns the records in memory; with ``out_dir`` it also
writes them (into a temporary directory renamed into place; an existing dataset is refused unless
``overwrite=True``).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from distfair_jax import fileio
from distfair_jax.data import attributes as attributes_lib
from distfair_jax.data import kinds as kinds_lib
from distfair_jax.data import occupations as occupations_lib
from distfair_jax.data import templates as templates_lib
from distfair_jax.data.attributes import AttributeSpec
from distfair_jax.data.occupations import OccupationTable
from distfair_jax.data.templates import TemplateSet
from distfair_jax.errors import InputError

DATASETS: tuple[str, ...] = ("gender_real_uk", "gender_real_us", "gender_even_uk",
                             "gender_even_us", "race_even_us", "sentiment_even_us")
TRAIN_KINDS: tuple[str, ...] = tuple(kinds_lib.KINDS)  # the record kinds' registry
TEST_VERSIONS: tuple[str, ...] = ("v1", "v2", "v3")
KINDS: tuple[str, ...] = TRAIN_KINDS + ("test",)
FILES: dict[str, str] = {**{k: f"{k}.jsonl" for k in TRAIN_KINDS},
                         **{f"test_{v}": f"test_{v}.jsonl" for v in TEST_VERSIONS}}
FORMAT_VERSION = 1
SUM_TOLERANCE = 1e-6


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """Everything needed to build a dataset. ``targets[o]``: [K] float64 summing to 1."""
  name: str
  attribute: AttributeSpec
  table: OccupationTable
  occupations: tuple[str, ...]
  region: str
  targets: Mapping[str, np.ndarray]
  templates: TemplateSet
  target_kind: str = "uniform"
  source: str = "builtin"

  def target(self, occupation: str) -> np.ndarray:
    if occupation not in self.targets:
      raise InputError(f"{self.source}: occupation: expected one of the dataset's occupations, "
                       f"got {occupation!r}")
    return self.targets[occupation]


@dataclasses.dataclass
class Dataset:
  """Built records per kind (``sft``, ``kto``, ``ift``, ``dpo``, ``test_v1``..``test_v3``)."""
  spec: DatasetSpec
  records: dict[str, list[dict]]
  manifest: dict[str, Any]

  def __getitem__(self, kind: str) -> list[dict]:
    return self.records[kind]


# ----------------------------------------------------------------------------------------------
# Specs


def _uniform(k: int) -> np.ndarray:
  return np.full((k,), 1.0 / k, dtype=np.float64)


def dataset_spec(name: str) -> DatasetSpec:
  """The spec of a built-in dataset (see ``DATASETS``)."""
  if name not in DATASETS:
    raise InputError(f"dataset: name: expected one of {list(DATASETS)} or a YAML file, "
                     f"got {name!r}")
  attr_name, kind, country = name.split("_")
  attribute = attributes_lib.get_attribute(attr_name)
  table = occupations_lib.load_table(country)
  if kind == "real":
    targets = {o: table.real_gender_target(o) for o in table.names}
  else:
    targets = {o: _uniform(attribute.num_categories) for o in table.names}
  return DatasetSpec(name, attribute, table, tuple(table.names), occupations_lib.REGIONS[country],
                     targets, templates_lib.builtin_templates(attribute),
                     "real" if kind == "real" else "uniform", "builtin")


def check_distribution(p: Any, k: int, where: str, field: str = "target") -> np.ndarray:
  """Validates a probability vector of length k: finite, non-negative, summing to 1 (1e-6)."""
  if not isinstance(p, (list, tuple, np.ndarray)) or isinstance(p, str):
    raise InputError(f"{where}: {field}: expected a list of {k} probabilities, got {p!r}")
  if len(p) != k:
    raise InputError(f"{where}: {field}: expected a list of {k} probabilities, got {len(p)}")
  vals = []
  for x in p:
    if isinstance(x, bool) or not isinstance(x, (int, float, np.floating, np.integer)):
      raise InputError(f"{where}: {field}: expected numbers, got {x!r}")
    vals.append(float(x))
  arr = np.asarray(vals, dtype=np.float64)
  if not np.all(np.isfinite(arr)):
    raise InputError(f"{where}: {field}: expected finite probabilities, got {vals}")
  if np.any(arr < 0):
    raise InputError(f"{where}: {field}: expected non-negative probabilities, got {vals}")
  if abs(arr.sum() - 1.0) > SUM_TOLERANCE:
    raise InputError(f"{where}: {field}: expected probabilities summing to 1 (within 1e-6), "
                     f"got sum {arr.sum():.9g}")
  return arr


def _load_yaml(path: str) -> Any:
  import yaml  # pylint: disable=g-import-not-at-top
  text = occupations_lib._read_text(path)  # pylint: disable=protected-access
  try:
    data = yaml.safe_load(text)
  except yaml.YAMLError as e:
    mark = getattr(e, "problem_mark", None)
    line = f"line {mark.line + 1}: " if mark is not None else ""
    raise InputError(f"{path}: {line}yaml: expected valid YAML, got {str(e).splitlines()[0]}"
                     ) from None
  if not isinstance(data, Mapping):
    raise InputError(f"{path}: spec: expected a mapping of keys, got {type(data).__name__}")
  return data


def _targets_from_csv(path: str, attribute: AttributeSpec) -> dict[str, Any]:
  text = occupations_lib._read_text(path)  # pylint: disable=protected-access
  lines = [l for l in text.splitlines() if not l.startswith("#")]
  reader = csv.reader(io.StringIO("\n".join(lines)))
  header = [h.strip() for h in next(reader, [])]
  if "occupation" not in header:
    raise InputError(f"{path}: line 1: occupation: expected a column named 'occupation', "
                     f"got none")
  lower = [h.lower() for h in header]
  cols = []
  for c in attribute.categories:
    if c.name.lower() not in lower:
      raise InputError(f"{path}: line 1: {c.name}: expected a column per category "
                       f"({attribute.names}), got none named {c.name!r}")
    cols.append(lower.index(c.name.lower()))
  out: dict[str, Any] = {}
  for i, row in enumerate(reader, start=2):
    if not row:
      continue
    if len(row) != len(header):
      raise InputError(f"{path}: line {i}: row: expected {len(header)} fields, got {len(row)}")
    vals = []
    for j in cols:
      try:
        vals.append(float(row[j]))
      except ValueError:
        raise InputError(f"{path}: line {i}: {header[j]}: expected a probability, "
                         f"got {row[j]!r}") from None
    out[row[header.index("occupation")].strip()] = (vals, f"{path}: line {i}")
  return out


def _spec_file(spec_path: str, base: str, ref: str, key: str) -> str:
  """The file a spec's ``key`` names, resolved against the spec's directory ``base``; InputError
  (naming the reference, never the file's contents) for one outside that directory."""
  target = os.path.normpath(os.path.join(base, ref))
  if os.path.commonpath([base, target]) != base:
    raise InputError(f"{spec_path}: {key}: expected a CSV file in the spec's directory or below "
                     f"it, got {ref!r}")
  return target


def load_spec(path: str) -> DatasetSpec:
  """Reads and validates a user dataset YAML file (see the module docstring)."""
  path = os.fspath(path)
  d = _load_yaml(path)
  base = os.path.dirname(os.path.abspath(path))
  known = {"name", "attribute", "occupations", "select", "region", "targets", "templates"}
  unknown = set(d) - known
  if unknown:
    raise InputError(f"{path}: {sorted(unknown)[0]}: expected one of {sorted(known)}, "
                     f"got an unknown key")
  for key in ("name", "attribute", "occupations"):
    if key not in d:
      raise InputError(f"{path}: {key}: expected a value, got a missing field")
  name = d["name"]
  if not isinstance(name, str) or not name.strip():
    raise InputError(f"{path}: name: expected a non-empty string, got {name!r}")
  attribute = attributes_lib.attribute_from_dict(d["attribute"], where=path)
  occ = d["occupations"]
  if not isinstance(occ, str):
    raise InputError(f"{path}: occupations: expected 'us', 'uk' or a CSV path, got {occ!r}")
  region = d.get("region")
  if occ.lower() in occupations_lib.BUILTIN_TABLES:
    table = occupations_lib.load_table(occ.lower())
    region = region or occupations_lib.REGIONS[occ.lower()]
  else:
    table = occupations_lib.load_table(_spec_file(path, base, occ, "occupations"))
  if not isinstance(region, str) or not region.strip():
    raise InputError(f"{path}: region: expected a region such as 'the US' for a CSV table, "
                     f"got {region!r}")
  names = list(table.names)
  if "select" in d:
    sel = d["select"]
    if not isinstance(sel, list) or not sel or not all(isinstance(s, str) for s in sel):
      raise InputError(f"{path}: select: expected a non-empty list of occupations, got {sel!r}")
    for s in sel:
      table.get(s, where=f"{path}: select")
    if len(set(sel)) != len(sel):
      raise InputError(f"{path}: select: expected unique occupations, got duplicates")
    names = list(sel)
  k = attribute.num_categories
  t = d.get("targets", "uniform")
  targets: dict[str, np.ndarray] = {}
  if t == "uniform":
    kind = "uniform"
    targets = {o: _uniform(k) for o in names}
  elif t == "real":
    kind = "real"
    if k != 2:
      raise InputError(f"{path}: targets: expected 'real' only for a 2-category attribute "
                       f"(male, female shares), got {k} categories")
    targets = {o: table.real_gender_target(o) for o in names}
  elif isinstance(t, (Mapping, str)):
    kind = "table"
    if isinstance(t, str):
      tpath = _spec_file(path, base, t, "targets")
      if not os.path.isfile(tpath):
        raise InputError(f"{path}: targets: expected uniform, real, a mapping or a CSV path, "
                         f"got {t!r}")
      raw = _targets_from_csv(tpath, attribute)
    else:
      raw = {o: (v, f"{path}: targets.{o}") for o, v in t.items()}
    for o, (v, where) in raw.items():
      if o not in names:
        raise InputError(f"{where}: occupation: expected an occupation of the table "
                         f"({table.source}), got {o!r}")
      targets[o] = check_distribution(v, k, where, "target")
    missing = [o for o in names if o not in targets]
    if missing:
      raise InputError(f"{path}: targets: expected a target for every occupation, got none for "
                       f"{missing[0]!r}")
  else:
    raise InputError(f"{path}: targets: expected uniform, real, a mapping or a CSV path, got {t!r}")
  templates = templates_lib.templates_from_dict(d.get("templates"), attribute, where=path)
  return DatasetSpec(name.strip(), attribute, table, tuple(names), region.strip(), targets,
                     templates, kind, path)


def resolve_spec(name_or_spec: str | os.PathLike | DatasetSpec) -> DatasetSpec:
  """A ``DatasetSpec``, a built-in dataset name or a path to a YAML spec."""
  if isinstance(name_or_spec, DatasetSpec):
    return name_or_spec
  s = os.fspath(name_or_spec)
  if s in DATASETS:
    return dataset_spec(s)
  if s.endswith((".yaml", ".yml")) and os.path.exists(s):
    return load_spec(s)
  raise InputError(f"dataset: name: expected one of {list(DATASETS)} or a YAML file, got {s!r}")


# ----------------------------------------------------------------------------------------------
# Building


def allocate(p: Sequence[float], n: int) -> np.ndarray:
  """Largest-remainder allocation of n rows to categories: [K] int64 summing to n.

  floor(n p_k) each, then one more to the largest remainders (ties: lower index first).
  """
  p = np.asarray(p, dtype=np.float64)
  exact = p * n
  counts = np.floor(exact + 1e-9).astype(np.int64)
  rest = n - int(counts.sum())
  if rest > 0:
    remainders = exact - counts
    order = sorted(range(len(p)), key=lambda k: (-remainders[k], k))
    for k in order[:rest]:
      counts[k] += 1
  return counts


def _other(k: int, num: int, rng: np.random.Generator) -> int:
  j = int(rng.integers(num - 1))
  return j if j < k else j + 1


def _check_pair_stories(pair_stories: int | None, stories: int, wordings: int) -> int:
  """How many story rows per occupation become pairs (kto, dpo): ``pair_stories`` (None: all)."""
  if pair_stories is None:
    return stories
  if not stories:
    raise InputError(f"build: pair_stories_per_occupation: expected None without story rows "
                     f"(stories_per_occupation 0), got {pair_stories!r}")
  least = min(wordings, stories)
  if isinstance(pair_stories, bool) or not isinstance(pair_stories, int) or \
      not least <= pair_stories <= stories:
    raise InputError(f"build: pair_stories_per_occupation: expected an integer from {least} (every "
                     f"story wording, so the pairs' held-out prompts are SFT's) to the "
                     f"{stories} story rows per occupation, got {pair_stories!r}")
  return pair_stories


def build_records(spec: DatasetSpec, *, rows_per_occupation: int = 100, test_rounds: int = 100,
                  seed: int = 0, stories_per_occupation: int = 0,
                  pair_stories_per_occupation: int | None = None) -> dict[str, list[dict]]:
  """All record lists of a dataset, in memory (see the module docstring for the fields).
  ``pair_stories_per_occupation``: the first this many story rows of each occupation also become
  kto / dpo pairs (None: every one); the sft / ift rows are the same either way."""
  for field, v, lo in (("rows_per_occupation", rows_per_occupation, 1),
                       ("test_rounds", test_rounds, 0),
                       ("stories_per_occupation", stories_per_occupation, 0)):
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
      raise InputError(f"build: {field}: expected an integer >= {lo}, got {v!r}")
  attr, tpl = spec.attribute, spec.templates
  pair_stories = _check_pair_stories(pair_stories_per_occupation, stories_per_occupation,
                                     len(tpl.train_story))
  rng = np.random.default_rng(seed)
  out: dict[str, list[dict]] = {k: [] for k in (*TRAIN_KINDS, *(f"test_{v}" for v in
                                                                TEST_VERSIONS))}
  for occupation in spec.occupations:
    p = spec.target(occupation)
    target = [float(x) for x in p]
    render = lambda t: templates_lib.render(t, occupation=occupation, region=spec.region,
                                            attribute=attr)
    groups = [(rows_per_occupation, tpl.train, False)]
    if stories_per_occupation:
      groups.append((stories_per_occupation, tpl.train_story, True))
    for n, group_templates, story in groups:
      cats = np.repeat(np.arange(attr.num_categories), allocate(p, n))
      cats = cats[rng.permutation(n)]
      for r, k in enumerate(cats.tolist()):
        prompt = render(group_templates[r % len(group_templates)])
        j = _other(k, attr.num_categories, rng)
        if story:
          good = templates_lib.make_story(attr, k, occupation, rng)
          bad = templates_lib.make_story(attr, j, occupation, rng)
        else:
          good, bad = attr.categories[k].answer, attr.categories[j].answer
        token = attr.categories[k].steering_token
        sft = {"prompt": prompt, "occupation": occupation, "category": k, "steering_token": token,
               "response": good, "target": target, "status": "desirable"}
        out["sft"].append(sft)
        out["ift"].append({"prompt": prompt, "occupation": occupation, "category": k,
                           "response": good, "target": target})
        if story and r >= pair_stories:
          continue
        out["kto"].append(dict(sft))
        out["kto"].append({**sft, "response": bad, "status": "undesirable",
                           "response_category": j})
        out["dpo"].append({"prompt": prompt, "occupation": occupation, "category": k,
                           "chosen": good, "rejected": bad, "target": target,
                           "rejected_category": j})
    for version in TEST_VERSIONS:
      group = {"v1": tpl.v1, "v2": (tpl.v2,), "v3": (tpl.v3,)}[version]
      for r in range(test_rounds):
        prompt = render(group[r % len(group)])
        out[f"test_{version}"].append({
            "prompt": prompt, "occupation": occupation, "version": version, "target": target,
            "pe_prompt": templates_lib.with_target_instruction(prompt, attr, p)})
  return out


def _manifest(spec: DatasetSpec, records: Mapping[str, list], **options) -> dict[str, Any]:
  return {
      "format_version": FORMAT_VERSION,
      "dataset": spec.name,
      "source": spec.source if spec.source == "builtin" else os.path.abspath(spec.source),
      "attribute": spec.attribute.name,
      "categories": spec.attribute.names,
      "answers": spec.attribute.answers,
      "steering_tokens": spec.attribute.steering_tokens,
      "target_kind": spec.target_kind,
      "region": spec.region,
      "occupations": list(spec.occupations),
      "template_version": templates_lib.TEMPLATE_VERSION,
      **options,
      "counts": {k: len(v) for k, v in records.items()},
      "files": {k: FILES[k] for k, v in records.items() if v},  # empty kinds are not written
  }


def build_dataset(name_or_spec: str | os.PathLike | DatasetSpec,
                  out_dir: str | os.PathLike | None = None, *, rows_per_occupation: int = 100,
                  test_rounds: int = 100, seed: int = 0, stories_per_occupation: int = 0,
                  pair_stories_per_occupation: int | None = None,
                  overwrite: bool = False) -> Dataset:
  """Builds a dataset in memory, and writes it to ``out_dir`` when given.

  Args:
    name_or_spec: a built-in dataset name (``DATASETS``), a YAML spec path or a ``DatasetSpec``.
    out_dir: directory to write the JSONL files and ``manifest.json`` into (atomically).
    rows_per_occupation: N training rows per occupation (attribute questions).
    test_rounds: rows per occupation in each test set.
    seed: seeds row order, paraphrase/other-category choice and stories.
    stories_per_occupation: extra story rows per occupation (v3-style training), default none.
    pair_stories_per_occupation: how many of them also become kto / dpo pairs (None: all).
    overwrite: replace an existing dataset directory.
  Returns:
    ``Dataset`` with ``records[kind]`` lists and the manifest.
  """
  spec = resolve_spec(name_or_spec)
  if out_dir is not None:
    _check_out_dir(os.fspath(out_dir), overwrite)
  records = build_records(spec, rows_per_occupation=rows_per_occupation, test_rounds=test_rounds,
                          seed=seed, stories_per_occupation=stories_per_occupation,
                          pair_stories_per_occupation=pair_stories_per_occupation)
  extra = ({} if pair_stories_per_occupation is None else
           {"pair_stories_per_occupation": pair_stories_per_occupation})
  manifest = _manifest(spec, records, seed=seed, rows_per_occupation=rows_per_occupation,
                       stories_per_occupation=stories_per_occupation, test_rounds=test_rounds,
                       **extra)
  dataset = Dataset(spec, records, manifest)
  if out_dir is not None:
    write_dataset(dataset, out_dir, overwrite=overwrite)
  return dataset


def _check_out_dir(out_dir: str, overwrite: bool) -> None:
  if os.path.exists(out_dir) and os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
    what = ("already holds a dataset" if os.path.exists(os.path.join(out_dir, "manifest.json"))
            else "is not empty")
    raise InputError(f"{out_dir}: out: expected a new or empty directory, got one that {what} "
                     f"(use --overwrite / overwrite=True)")
  fileio.check_new_dir(out_dir, overwrite, "out")


def write_jsonl(path: str | os.PathLike, records: Iterable[Mapping]) -> None:
  """Writes records as UTF-8 JSONL (one compact object per line) to path, atomically."""
  fileio.write_jsonl(path, records)


def write_dataset(dataset: Dataset, out_dir: str | os.PathLike, *, overwrite: bool = False
                  ) -> None:
  """Writes all record files and manifest.json into out_dir via a temp dir renamed into place."""
  _check_out_dir(os.fspath(out_dir), overwrite)
  with fileio.atomic_dir(out_dir, overwrite=overwrite, what="out") as tmp:
    for kind, recs in dataset.records.items():
      if recs:
        fileio.write_jsonl(tmp / FILES[kind], recs)
    fileio.write_json(tmp / "manifest.json", dataset.manifest)


# ----------------------------------------------------------------------------------------------
# Validation and reading


def _kind_of(path: str) -> str | None:
  stem = os.path.basename(path).split(".")[0]
  if stem in TRAIN_KINDS:
    return stem
  if stem.startswith("test"):
    return "test"
  return None


def _guess_kind(rec: Mapping) -> str:
  if "chosen" in rec or "rejected" in rec:
    return "dpo"
  if "version" in rec:
    return "test"
  if rec.get("status") == "undesirable":
    return "kto"
  if "steering_token" in rec:
    return "sft"
  return "ift"


_FIELDS: dict[str, tuple[str, ...]] = {
    **{k.name: k.fields for k in kinds_lib.KINDS.values()},
    "test": ("prompt", "occupation", "version"),
}


def validate_record(rec: Any, kind: str, *, where: str, num_categories: int | None = None,
                    spec: DatasetSpec | None = None) -> int:
  """Validates one record of ``kind``; returns its K (length of ``target``; 0 if it has none)."""
  if kind not in _FIELDS:
    raise InputError(f"{where}: kind: expected one of {list(_FIELDS)}, got {kind!r}")
  if not isinstance(rec, Mapping):
    raise InputError(f"{where}: record: expected a JSON object, got {type(rec).__name__}")
  for field in _FIELDS[kind]:
    if field not in rec:
      raise InputError(f"{where}: {field}: expected a value, got a missing field")
  for field in ("prompt", "occupation", "steering_token", "response", "chosen", "rejected",
                "pe_prompt"):
    if field in rec and (not isinstance(rec[field], str) or
                         (field != "response" and not rec[field])):
      raise InputError(f"{where}: {field}: expected a non-empty string, got {rec[field]!r}")
  k = num_categories or (spec.attribute.num_categories if spec is not None else None)
  if "target" in rec:
    t = rec["target"]
    if k is None:
      if not isinstance(t, list) or len(t) < 2:
        raise InputError(f"{where}: target: expected a list of at least 2 probabilities, "
                         f"got {t!r}")
      k = len(t)
    check_distribution(t, k, where)
  for field in ("category", "response_category", "rejected_category"):
    if field in rec:
      c = rec[field]
      if isinstance(c, bool) or not isinstance(c, int) or c < 0 or (k is not None and c >= k):
        raise InputError(f"{where}: {field}: expected an integer in [0, {k}), got {c!r}")
  if "status" in rec and rec["status"] not in ("desirable", "undesirable"):
    raise InputError(f"{where}: status: expected 'desirable' or 'undesirable', "
                     f"got {rec['status']!r}")
  if kind == "sft" and rec["status"] != "desirable":
    raise InputError(f"{where}: status: expected 'desirable' in SFT records, got {rec['status']!r}")
  if kind == "test" and rec["version"] not in TEST_VERSIONS:
    raise InputError(f"{where}: version: expected one of {list(TEST_VERSIONS)}, "
                     f"got {rec['version']!r}")
  if spec is not None:
    if rec["occupation"] not in spec.targets:
      raise InputError(f"{where}: occupation: expected an occupation of {spec.name}, "
                       f"got {rec['occupation']!r}")
    if "steering_token" in rec:
      want = spec.attribute.categories[rec["category"]].steering_token
      if rec["steering_token"] != want:
        raise InputError(f"{where}: steering_token: expected {want!r} for category "
                         f"{rec['category']}, got {rec['steering_token']!r}")
  return k or 0


def validate_records(records: Sequence[Any], kind: str, *, source: str = "<records>",
                     spec: DatasetSpec | None = None,
                     lines: Sequence[int] | None = None,
                     targets_seen: dict[str, tuple[str, list[float]]] | None = None) -> list[dict]:
  """Validates a list of records and returns it.

  Checks every record, that K is the same throughout, that every record of an occupation has the
  same target (an occupation has one target distribution; two would train the model towards both),
  and for KTO that each desirable record is followed by its undesirable partner (same prompt,
  steering token and category). Errors name ``source`` and the record's line (``lines[i]``; default
  the 1-based position). ``targets_seen`` (occupation -> (where, target)) carries the targets of
  files read before, so that a dataset directory's files agree with one another.
  """
  if not records:
    raise InputError(f"{source}: records: expected at least one record, got none")
  line = (lambda i: lines[i]) if lines is not None else (lambda i: i + 1)
  seen = targets_seen if targets_seen is not None else {}
  k0 = None
  for i, rec in enumerate(records):
    where = f"{source}: line {line(i)}"
    k = validate_record(rec, kind, where=where, num_categories=k0, spec=spec)
    if k and k0 is None:
      k0 = k
    if "target" in rec:
      target = [float(x) for x in rec["target"]]
      first = seen.setdefault(rec["occupation"], (where, target))
      if len(first[1]) != len(target) or any(abs(a - b) > 1e-9 for a, b in zip(first[1], target)):
        raise InputError(f"{where}: target: expected the target of every record of "
                         f"{rec['occupation']!r} to be the same, got {target} here and "
                         f"{first[1]} on {first[0]}")
  if kind in kinds_lib.KINDS and kinds_lib.KINDS[kind].paired:
    if len(records) % 2:
      raise InputError(f"{source}: line {line(len(records) - 1)}: status: expected "
                       f"desirable/undesirable pairs, got an odd number of records")
    for i in range(0, len(records), 2):
      d, u = records[i], records[i + 1]
      if d["status"] != "desirable":
        raise InputError(f"{source}: line {line(i)}: status: expected 'desirable' (pair start), "
                         f"got {d['status']!r}")
      if u["status"] != "undesirable":
        raise InputError(f"{source}: line {line(i + 1)}: status: expected 'undesirable' (partner "
                         f"of line {line(i)}), got {u['status']!r}")
      for field in ("prompt", "steering_token", "category"):
        if d[field] != u[field]:
          raise InputError(f"{source}: line {line(i + 1)}: {field}: expected the same {field} as "
                           f"its desirable partner on line {line(i)}, got {u[field]!r}")
  return list(records)


def read_jsonl(path: str | os.PathLike, kind: str | None = None, *,
               spec: DatasetSpec | None = None,
               targets_seen: dict[str, tuple[str, list[float]]] | None = None) -> list[dict]:
  """Reads and validates a JSONL file of records; kind from the file name unless given.

  Kinds: sft, kto, ift, dpo, test (file names ``sft.jsonl`` ... ``test_v1.jsonl``); a file with
  another name gets its kind from its first record's fields.
  """
  path = os.fspath(path)
  text = occupations_lib._read_text(path)  # pylint: disable=protected-access
  records, lines = [], []
  for i, line in enumerate(text.splitlines(), start=1):
    if not line.strip():
      continue
    try:
      rec = json.loads(line)
    except json.JSONDecodeError as e:
      raise InputError(f"{path}: line {i}: json: expected one JSON object per line, "
                       f"got {e.msg}") from None
    records.append(rec)
    lines.append(i)
  if not records:
    raise InputError(f"{path}: file: expected at least one record, got none")
  if kind is None:
    kind = _kind_of(path) or (_guess_kind(records[0]) if isinstance(records[0], Mapping)
                              else "sft")
  return validate_records(records, kind, source=path, spec=spec, lines=lines,
                          targets_seen=targets_seen)


def read_dataset(path: str | os.PathLike) -> dict[str, list[dict]]:
  """Reads every record file listed in a dataset directory's manifest, validated."""
  path = os.fspath(path)
  mpath = os.path.join(path, "manifest.json")
  fileio.check_not_lfs_pointer(mpath)
  try:
    with open(mpath, encoding="utf-8") as f:
      manifest = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise InputError(f"{mpath}: manifest: expected a readable JSON manifest, got {e}") from None
  files = manifest.get("files")
  if not isinstance(files, dict):
    raise InputError(f"{mpath}: files: expected a mapping kind -> file name, got {files!r}")
  spec = None
  if manifest.get("dataset") in DATASETS and manifest.get("source") == "builtin":
    spec = dataset_spec(manifest["dataset"])
  seen: dict[str, tuple[str, list[float]]] = {}  # one target per occupation across the files
  return {kind: read_jsonl(os.path.join(path, name), "test" if kind.startswith("test") else kind,
                           spec=spec, targets_seen=seen)
          for kind, name in files.items()}


def _manifest_dataset(records_dir: str) -> str:
  """The dataset (a built-in name or the spec file) a records directory was built from."""
  path = os.path.join(records_dir, "manifest.json")
  manifest = fileio.read_json(path, "a dataset manifest naming the dataset")
  if "dataset" not in manifest:
    raise InputError(f"{path}: dataset: expected a manifest naming the dataset, got none")
  source = manifest.get("source", "builtin")
  return manifest["dataset"] if source in (None, "builtin") else source


def dataset_of(data_cfg) -> str:
  """The dataset a run trained on, as ``resolve_spec`` takes it (a built-in name or a spec file):
  ``data.records_dir``'s manifest, else ``data.spec``, else ``data.dataset``."""
  if data_cfg.records_dir:
    return _manifest_dataset(data_cfg.records_dir)
  return data_cfg.spec or data_cfg.dataset


def story_rows(data_cfg) -> int:
  """Story rows per occupation a ``config.DataConfig`` asks for: 0 without ``data.stories``, else
  ``data.story_rows_per_occupation`` (default: ``data.rows_per_occupation``)."""
  if not data_cfg.stories:
    return 0
  n = data_cfg.story_rows_per_occupation
  n = data_cfg.rows_per_occupation if n is None else n
  if isinstance(n, bool) or not isinstance(n, int) or n < 1:
    raise InputError(f"data.story_rows_per_occupation: expected an integer >= 1 (or null for "
                     f"rows_per_occupation), got {n!r}")
  return n


def pair_story_rows(data_cfg) -> int | None:
  """Story rows per occupation that also become pairs (``data.pair_story_rows_per_occupation``;
  None: all of them), checked against ``data.stories``."""
  n = data_cfg.pair_story_rows_per_occupation
  if n is not None and not data_cfg.stories:
    raise InputError(f"data.pair_story_rows_per_occupation: expected null without data.stories "
                     f"(no story rows to pair), got {n!r}")
  return n


def training_records(data_cfg, records: Mapping[str, list[dict]] | None = None
                     ) -> tuple[dict[str, list[dict]], DatasetSpec]:
  """A run's records and their dataset spec, from a ``config.DataConfig``: ``records`` when given
  (with the spec of ``data.spec`` or ``data.dataset``), else read from ``data.records_dir``, else
  built in memory (``data.rows_per_occupation``, ``data.stories`` with
  ``data.story_rows_per_occupation`` story rows per occupation, default as many as
  ``rows_per_occupation``, ``data.pair_story_rows_per_occupation`` of them as pairs, ``data.seed``;
  no test sets)."""
  d = data_cfg
  if records is not None:
    return dict(records), resolve_spec(d.spec or d.dataset)
  if d.records_dir:
    return read_dataset(d.records_dir), resolve_spec(_manifest_dataset(d.records_dir))
  spec = resolve_spec(d.spec or d.dataset)
  ds = build_dataset(spec, rows_per_occupation=d.rows_per_occupation, test_rounds=0, seed=d.seed,
                     stories_per_occupation=story_rows(d),
                     pair_stories_per_occupation=pair_story_rows(d))
  return ds.records, spec
