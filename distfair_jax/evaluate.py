"""Multi-round evaluation: sample, parse or judge, score against the targets, write the outputs.

For each test version (v1, v2: attribute questions; v3: stories) the test-set records of the data
package (one record per round: ``prompt``, ``occupation``, ``target``, optionally ``pe_prompt``) are
answered by the model with one decoding configuration (:class:`~distfair_jax.sample.DecodeConfig`).
Every distinct prompt is prefilled once and its rounds decoded together (``sample.generate``).
Attribute answers are parsed with :class:`~distfair_jax.parsing.CategoryParser` (last category word
or synonym), stories go to a judge (:mod:`distfair_jax.judges`); unparsed answers are kept as
``category: null`` and counted, never dropped from view. With ``steering="model"`` the exact
steering-token distribution per occupation (``sample.steering_distribution``, no sampling) adds
``exact_mae``.

Outputs (under ``out_dir``, written into a temporary directory renamed into place):

  eval/<version>.jsonl   one row per sample: occupation, prompt, steering_token (or null), response,
                         category (or null), round
  eval/metrics.json      ``{"versions": {version: metrics.evaluate_version(...)}, "meta": {...}}``;
                         meta records the decoding configuration, steering mode, steering and stop
                         token ids, rounds, seed, judge and timing
  eval/report.md, eval/plots/*.png   from ``report.write_report``
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import numpy as np

from distfair_jax import metrics as metrics_lib
from distfair_jax import sample as sample_lib
from distfair_jax.errors import InputError
from distfair_jax.parsing import CategoryParser
from distfair_jax.sample import DecodeConfig

VERSIONS = ("v1", "v2", "v3")
STORY_VERSIONS = frozenset({"v3"})


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """What one evaluation run does (recorded in eval/metrics.json).

  rounds: samples per occupation per version (None: as many as the test set has records).
  steering: model | target | none. prompt_field: ``prompt`` or ``pe_prompt`` (the prompt-engineering
  baseline's wording). batch_size: about how many rows are decoded together.
  """
  versions: tuple[str, ...] = VERSIONS
  rounds: int | None = 100
  steering: str = "model"
  decode: DecodeConfig = DecodeConfig()
  batch_size: int = 256
  seed: int = 0
  n_bootstrap: int = 1000
  prompt_field: str = "prompt"
  prompt_format: str = "chat"
  plots: bool = True

  def __post_init__(self):
    bad = [v for v in self.versions if v not in VERSIONS]
    if not self.versions or bad:
      raise InputError(f"eval: versions: expected a non-empty subset of {', '.join(VERSIONS)}, "
                       f"got {', '.join(self.versions) or 'none'}")
    if self.rounds is not None and (not isinstance(self.rounds, int) or self.rounds < 1):
      raise InputError(f"eval: rounds: expected an integer >= 1, got {self.rounds!r}")
    if self.steering not in sample_lib.STEERING_MODES:
      raise InputError(f"eval: steering: expected one of {', '.join(sample_lib.STEERING_MODES)}, "
                       f"got {self.steering!r}")
    if self.prompt_field not in ("prompt", "pe_prompt"):
      raise InputError(f"eval: prompt_field: expected prompt or pe_prompt, got {self.prompt_field!r}")
    if self.batch_size < 1 or self.n_bootstrap < 0:
      raise InputError(f"eval: expected batch_size >= 1 and n_bootstrap >= 0, got "
                       f"{self.batch_size} and {self.n_bootstrap}")

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["versions"] = list(self.versions)
    return d


# --------------------------------------------------------------------------------------------------
# Tokenizer-dependent pieces: the data package's Encoder, so that evaluation prompts and steering
# tokens are tokenized exactly as in training.


@dataclasses.dataclass
class PromptCodec:
  """Prompt ids, steering ids [K] (None when not steered), stop ids and pad id for one tokenizer."""
  encode: Callable[[Sequence[str]], list[list[int]]]
  steering_ids: list[int] | None
  stop_ids: list[int]
  pad_id: int


def prompt_codec(tokenizer, attribute, *, prompt_format: str = "chat",
                 steered: bool = True) -> PromptCodec:
  """Builds a :class:`PromptCodec` from ``data.tokenize.Encoder`` (checks the steering tokens)."""
  from distfair_jax.data.tokenize import Encoder
  encoder = Encoder(tokenizer, attribute=attribute if steered else None,
                    prompt_format=prompt_format)
  stops = set(sample_lib.stop_token_ids(tokenizer))
  if encoder.end_ids:
    stops.add(int(encoder.end_ids[0]))  # the end-of-turn token (not what the template adds after)
  steering = None if encoder.steering_ids is None else [int(i) for i in encoder.steering_ids]
  return PromptCodec(encode=lambda qs: [list(encoder.prompt_ids(q)) for q in qs],
                     steering_ids=steering, stop_ids=sorted(stops), pad_id=encoder.pad_id)


# --------------------------------------------------------------------------------------------------
# Test sets


def _group_records(records: Sequence[Mapping], version: str, field: str, rounds: int | None,
                   k: int) -> tuple[list[dict], dict[str, list[float]]]:
  """Validated sample slots and targets. Each record is one round; with ``rounds`` given, each
  occupation's records are cycled (or cut) to exactly ``rounds`` slots.

  Returns (slots: list of {occupation, prompt} in record order, targets: occupation -> [K]).
  """
  where = f"test set {version}"
  per_occ: dict[str, list[str]] = {}
  targets: dict[str, list[float]] = {}
  for i, rec in enumerate(records):
    if not isinstance(rec, Mapping):
      raise InputError(f"{where}: record {i}: expected an object, got {type(rec).__name__}")
    occ, prompt, target = rec.get("occupation"), rec.get(field), rec.get("target")
    if not isinstance(occ, str) or not occ:
      raise InputError(f"{where}: record {i}: occupation: expected a string, got {occ!r}")
    if not isinstance(prompt, str) or not prompt.strip():
      raise InputError(f"{where}: record {i}: {field}: expected a non-empty string, got {prompt!r}")
    t = np.asarray(target, np.float64) if isinstance(target, (list, tuple, np.ndarray)) else None
    if t is None or t.shape != (k,) or np.any(t < 0) or abs(t.sum() - 1) > 1e-3:
      raise InputError(f"{where}: record {i}: target: expected {k} probabilities summing to 1, "
                       f"got {target!r}")
    if occ in targets and not np.allclose(targets[occ], t):
      raise InputError(f"{where}: record {i}: target: expected the same target for every record "
                       f"of {occ!r}, got {target!r}")
    targets[occ] = t.tolist()
    per_occ.setdefault(occ, []).append(prompt)
  if not per_occ:
    raise InputError(f"{where}: expected at least one record, got none")
  slots = []
  for occ, prompts in per_occ.items():
    n = len(prompts) if rounds is None else rounds
    slots.extend({"occupation": occ, "prompt": prompts[r % len(prompts)]} for r in range(n))
  return slots, targets


# --------------------------------------------------------------------------------------------------
# One version


def _version_seed(seed: int, version: str) -> int:
  return (int(seed) * 1_000_003 + zlib.crc32(version.encode())) % (2 ** 31)


def sample_version(model_or_graph_state, tokenizer, attribute, slots: Sequence[Mapping], *,
                   version: str, config: EvalConfig, codec: PromptCodec,
                   targets: Mapping[str, Sequence[float]]) -> list[dict]:
  """Samples one response per slot; rows: occupation, prompt, steering_token, response, round."""
  distinct = list(dict.fromkeys(s["prompt"] for s in slots))
  need = {p: 0 for p in distinct}
  occ_of = {}
  for s in slots:
    need[s["prompt"]] += 1
    occ_of.setdefault(s["prompt"], s["occupation"])
  rounds = max(need.values())
  max_new = (config.decode.story_max_new_tokens if version in STORY_VERSIONS
             else config.decode.max_new_tokens)
  target = None
  if config.steering == "target":
    target = np.asarray([targets[occ_of[p]] for p in distinct], np.float32)
  out = sample_lib.generate(
      model_or_graph_state, codec.encode(distinct), rounds=rounds, config=config.decode,
      max_new_tokens=max_new, steering=config.steering, steering_ids=codec.steering_ids,
      target=target, stop_ids=codec.stop_ids, pad_id=codec.pad_id,
      seed=_version_seed(config.seed, version), batch_size=config.batch_size, tokenizer=tokenizer)
  # Hand each slot the next unused round of its prompt (record order kept).
  used = {p: 0 for p in distinct}
  index = {p: i for i, p in enumerate(distinct)}
  tokens = attribute.steering_tokens
  rows = []
  for s in slots:
    p = s["prompt"]
    r = used[p]
    used[p] += 1
    j = index[p] * rounds + r
    steer = int(out.steering_index[j])
    rows.append({"occupation": s["occupation"], "prompt": p,
                 "steering_token": tokens[steer] if steer >= 0 else None,
                 "response": out.text[j], "round": r})
  return rows


def categorize(rows: list[dict], attribute, *, story: bool, judge=None) -> list[dict]:
  """Adds ``category`` (int or None) to each row: parsed answer (v1, v2) or judged story (v3)."""
  synonyms = [list(c.synonyms) for c in attribute.categories]
  texts = [r["response"] for r in rows]
  if story:
    if judge is None:
      from distfair_jax.judges import RulesJudge
      judge = RulesJudge()
    cats = judge.judge_many(texts, attribute.names, attribute=attribute.name, synonyms=synonyms)
  else:
    cats = CategoryParser(attribute.names, synonyms, source=f"attribute {attribute.name}").parse_many(
        texts)
  for row, c in zip(rows, cats):
    row["category"] = None if c is None else int(c)
  return rows


def exact_distributions(model_or_graph_state, slots: Sequence[Mapping], encode: Callable,
                        steering_ids: Sequence[int], pad_id: int,
                        batch_size: int = 64) -> dict[str, list[float]]:
  """occupation -> exact steering distribution [K], averaged over its slots' prompts (one forward
  per distinct prompt, weighted by how many slots use it)."""
  distinct = list(dict.fromkeys(s["prompt"] for s in slots))
  ids = encode(distinct)
  length = sample_lib.bucket_length(max(len(x) for x in ids))
  probs = []
  batch = min(batch_size, 1 << (len(ids) - 1).bit_length())
  for start in range(0, len(ids), batch):
    chunk = ids[start:start + batch]
    chunk = chunk + [chunk[-1]] * (batch - len(chunk))  # fixed shape: one compile
    input_ids, mask = sample_lib.left_pad(chunk, pad_id, length)
    probs.append(sample_lib.steering_distribution(model_or_graph_state, input_ids, mask,
                                                  steering_ids))
  probs = np.concatenate(probs)[:len(distinct)].astype(np.float64)
  row = {p: i for i, p in enumerate(distinct)}
  sums: dict[str, np.ndarray] = {}
  counts: dict[str, int] = {}
  for s in slots:
    o = s["occupation"]
    sums[o] = sums.get(o, 0) + probs[row[s["prompt"]]]
    counts[o] = counts.get(o, 0) + 1
  return {o: (sums[o] / counts[o] / (sums[o] / counts[o]).sum()).tolist() for o in sums}


# --------------------------------------------------------------------------------------------------
# Output


def write_jsonl(path: str, rows: Sequence[Mapping]) -> None:
  with open(path, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _install(tmp_dir: str, final_dir: str, overwrite: bool) -> None:
  """Renames tmp_dir to final_dir (replacing an existing one only with overwrite)."""
  if os.path.exists(final_dir):
    if not overwrite:
      raise InputError(f"{final_dir}: eval: expected no existing evaluation (use --overwrite), "
                       f"got an existing directory")
    old = tempfile.mkdtemp(prefix=".eval.old-", dir=os.path.dirname(final_dir))
    os.rename(final_dir, os.path.join(old, "eval"))
    os.rename(tmp_dir, final_dir)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.rename(tmp_dir, final_dir)


def evaluate(model_or_graph_state, tokenizer, attribute, test_sets: Mapping[str, Sequence[Mapping]],
             out_dir: str | os.PathLike, *, config: EvalConfig = EvalConfig(), judge=None,
             overwrite: bool = False, metadata: Mapping[str, Any] | None = None,
             progress: Callable[[str], None] | None = None) -> dict[str, Any]:
  """Runs the evaluation and writes ``out_dir/eval`` (see the module docstring).

  Args:
    model_or_graph_state: an ``nnx.Module`` (Llama contract) or its ``(graphdef, state)``.
    tokenizer: Hugging Face tokenizer (chat template; decodes responses).
    attribute: ``data.attributes.AttributeSpec`` (categories, synonyms, steering tokens).
    test_sets: version -> test records (``prompt``, ``occupation``, ``target``, ``pe_prompt``), e.g.
      ``data.build.build_dataset(name)["test_v2"]``.
    out_dir: run directory; results go to ``out_dir/eval``.
    config: versions, rounds, steering mode, decoding, seed, bootstrap.
    judge: story judge for v3 (default: ``judges.RulesJudge()``).
    overwrite: replace an existing ``out_dir/eval``.
    metadata: extra JSON-serialisable facts recorded in ``meta`` (model path, dataset, ...).
    progress: optional callback receiving one line per finished version.
  Returns:
    the metrics document written to eval/metrics.json: ``{"versions": {version: metrics},
    "meta": {decoding, steering, rounds, seed, judge, timing, ...}}``.
  """
  from distfair_jax import report as report_lib
  out_dir = os.fspath(out_dir)
  final_dir = os.path.join(out_dir, "eval")
  if os.path.exists(final_dir) and not overwrite:
    raise InputError(f"{final_dir}: eval: expected no existing evaluation (use --overwrite), "
                     f"got an existing directory")
  missing = [v for v in config.versions if v not in test_sets]
  if missing:
    raise InputError(f"eval: test_sets: expected records for {', '.join(missing)}, got none")
  k = attribute.num_categories
  codec = prompt_codec(tokenizer, attribute, prompt_format=config.prompt_format,
                       steered=config.steering != "none")
  if judge is None and any(v in STORY_VERSIONS for v in config.versions):
    from distfair_jax.judges import RulesJudge
    judge = RulesJudge()
  graph_state = sample_lib.split_model(model_or_graph_state)  # split once: compiles are shared

  versions: dict[str, Any] = {}
  rows_by_version: dict[str, list[dict]] = {}
  timing: dict[str, Any] = {}
  for version in config.versions:
    slots, targets = _group_records(test_sets[version], version, config.prompt_field,
                                    config.rounds, k)
    start = time.perf_counter()
    rows = sample_version(graph_state, tokenizer, attribute, slots, version=version, config=config,
                          codec=codec, targets=targets)
    sampled = time.perf_counter()
    categorize(rows, attribute, story=version in STORY_VERSIONS, judge=judge)
    exact = None
    if config.steering == "model":
      exact = exact_distributions(graph_state, slots, codec.encode, codec.steering_ids,
                                  codec.pad_id)
    versions[version] = metrics_lib.evaluate_version(
        rows, targets, k, n_bootstrap=config.n_bootstrap, seed=config.seed, exact=exact,
        categories=attribute.names, source=f"eval/{version}.jsonl")
    rows_by_version[version] = rows
    timing[version] = {"samples": len(rows), "sampling_s": round(sampled - start, 3),
                       "samples_per_s": round(len(rows) / max(sampled - start, 1e-9), 2),
                       "total_s": round(time.perf_counter() - start, 3)}
    if progress is not None:
      m = versions[version]
      progress(f"{version}: {len(rows)} samples in {sampled - start:.1f} s, MAE {m['mae']:.4f} "
               f"(std {m['mae_std']:.4f}), unparsed {m['unparsed_rate']:.1%}"
               + (f", exact MAE {m['exact_mae']:.4f}" if "exact_mae" in m else ""))

  meta = {
      "attribute": attribute.name, "categories": attribute.names,
      "steering": config.steering, "steering_tokens": attribute.steering_tokens,
      "steering_token_ids": codec.steering_ids, "stop_token_ids": codec.stop_ids,
      "decoding": config.decode.to_dict(), "rounds": config.rounds, "seed": config.seed,
      "prompt_field": config.prompt_field, "prompt_format": config.prompt_format,
      "n_bootstrap": config.n_bootstrap, "batch_size": config.batch_size,
      "judge": type(judge).__name__ if judge is not None else None,
      "timing": timing, **dict(metadata or {})}

  os.makedirs(out_dir, exist_ok=True)
  tmp_run = tempfile.mkdtemp(prefix=".eval.tmp-", dir=out_dir)
  try:
    tmp_eval = os.path.join(tmp_run, "eval")
    os.makedirs(tmp_eval)
    for version, rows in rows_by_version.items():
      write_jsonl(os.path.join(tmp_eval, f"{version}.jsonl"), rows)
    report_lib.write_report(tmp_run, versions, meta=meta, plots=config.plots)
    _install(tmp_eval, final_dir, overwrite)
  finally:
    shutil.rmtree(tmp_run, ignore_errors=True)
  return {"versions": versions, "meta": meta}
