"""Multi-round evaluation: sample, parse or judge, score against the targets, write the outputs.

For each test version (v1, v2: attribute questions; v3: stories) the test-set records of the data
package (one record per round: ``prompt``, ``occupation``, ``target``, optionally ``pe_prompt``) are
answered by the model with one decoding configuration (``config.DecodeConfig``) by a
``sample.Sampler``: every distinct prompt is prefilled once and its rounds decoded together.
Prompts, steering tokens and stops come from the run's ``data.tokenize.Encoder``, so they are
tokenized exactly as in training. Attribute answers are parsed with
:class:`~distfair_jax.evaluation.parsing.CategoryParser` (the category name mentioned last; with
``eval.parser: synonyms`` the attribute's synonyms count too), stories go to a judge
(:mod:`distfair_jax.evaluation.judges`); unparsed answers are kept as ``category: null`` and counted, never
dropped from view. With ``steering="model"`` the exact steering-token distribution per occupation
(``Sampler.steering_distribution``, no sampling) adds ``exact_mae``; for v1/v2 the exact
probabilities of the K canonical answers (summed over the steering tokens for a steered model)
add ``exact_answer_mae`` and the ``non_answer`` mass, for every method alike.

Outputs (under ``out_dir``, written into a temporary directory renamed into place):

  eval/<version>.jsonl   one row per sample: occupation, prompt, steering_token (or null), response,
                         category (or null), round
  eval/metrics.json      ``{"versions": {version: metrics.evaluate_version(...)}, "meta": {...}}``;
                         meta records the decoding configuration, steering mode, steering and stop
                         token ids, rounds, seed, judge and timing
  eval/report.md, eval/plots/*.png   from ``report.write_report``

While it runs, each finished version's rows are kept in ``eval-partial/`` (with the sampling
settings, a fingerprint of the weights and the version's timing); an evaluation stopped mid-way
and started again with the same model and settings scores those versions from them (``resumed``
in their timing: the rows sampling would give again) and samples only the rest. The directory
goes when ``eval/`` is written; one of other weights or settings is replaced.
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import numpy as np
from flax import nnx

from distfair_jax import console
from distfair_jax import distributed
from distfair_jax import fileio
from distfair_jax.evaluation import metrics as metrics_lib
from distfair_jax.evaluation import report as report_lib
from distfair_jax.config import EvalConfig, config_to_dict
from distfair_jax.data.tokenize import Encoder, next_pow2, pow2_bucket
from distfair_jax.errors import InputError
from distfair_jax.evaluation.judges import RulesJudge
from distfair_jax.evaluation.parsing import CategoryParser
from distfair_jax.evaluation.sample import Sampler, left_pad

__all__ = ["evaluate", "earlier_samples", "weights_fingerprint", "sample_version", "categorize",
           "exact_distributions", "bare_answers", "bare_answer_rate", "with_bare_answer_rates",
           "STORY_VERSIONS"]

STORY_VERSIONS = frozenset({"v3"})


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
  return (int(seed) * 1_000_003 + zlib.crc32(str(version).encode())) % (2 ** 31)


def sample_version(sampler: Sampler, state, encoder: Encoder, attribute, slots: Sequence[Mapping],
                   *, version: str, config: EvalConfig,
                   targets: Mapping[str, Sequence[float]]) -> list[dict]:
  """Samples one response per slot; rows: occupation, prompt, steering_token, response, round."""
  distinct = list(dict.fromkeys(s["prompt"] for s in slots))
  need = {p: 0 for p in distinct}
  occ_of = {}
  for s in slots:
    need[s["prompt"]] += 1
    occ_of.setdefault(s["prompt"], s["occupation"])
  d = config.decode
  max_new = d.story_max_new_tokens if version in STORY_VERSIONS else d.max_new_tokens
  target = None
  if config.steering == "target":
    target = np.asarray([targets[occ_of[p]] for p in distinct], np.float32)
  steering_ids = None if encoder.steering_ids is None else [int(i) for i in encoder.steering_ids]
  out = sampler.generate(
      state, encoder.encode_prompts(distinct), rounds=max(need.values()), config=d,
      max_new_tokens=max_new, steering=str(config.steering), steering_ids=steering_ids,
      target=target, stop_ids=encoder.stop_ids, pad_id=encoder.pad_id,
      seed=_version_seed(config.seed, version), batch_size=config.batch_size,
      tokenizer=encoder.tokenizer, steering_suffix=encoder.steering_suffix)
  # Hand each slot the next unused round of its prompt (record order kept).
  rounds = max(need.values())
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


def categorize(rows: list[dict], attribute, *, story: bool, judge=None,
               parser: str = "reference") -> list[dict]:
  """Adds ``category`` (int or None) to each row: parsed answer (v1, v2) or judged story (v3).

  ``parser`` (v1, v2): ``reference``, the category names (and each category's answer text
  where it differs, e.g. "Middle-aged" for ``middle_aged``) only, the paper's rule; or
  ``synonyms``, the attribute's synonyms too. The story judge always sees the synonyms.
  """
  synonyms = [list(c.synonyms) for c in attribute.categories]
  texts = [r["response"] for r in rows]
  if story:
    if judge is None:
      judge = RulesJudge()
    cats = judge.judge_many(texts, attribute.names, attribute=attribute.name, synonyms=synonyms)
  else:
    if str(parser) not in ("reference", "synonyms"):
      raise InputError(f"eval.parser: expected one of reference, synonyms, got {parser!r}")
    # reference: the category names and the answers the prompt asks for ("Middle-aged" for
    # middle_aged), nothing else
    terms = (synonyms if str(parser) == "synonyms" else
             [[c.answer] if c.answer.casefold() != c.name.casefold() else []
              for c in attribute.categories])
    cats = CategoryParser(attribute.names, terms, source=f"attribute {attribute.name}").parse_many(
        texts)
  for row, c in zip(rows, cats):
    row["category"] = None if c is None else int(c)
  return rows


def bare_answers(rows: Sequence[Mapping], attribute) -> list[bool]:
  """Per row of ``rows``: whether its response is a bare category word (a name, answer or
  synonym, nothing else): no story, though the judge counts it as that category."""
  parser = CategoryParser(attribute.names, [
      [t for t in (c.answer, *c.synonyms) if t.casefold() != c.name.casefold()]
      for c in attribute.categories], source=f"attribute {attribute.name}")
  return [parser.is_bare(r["response"]) for r in rows]


def bare_answer_rate(rows: Sequence[Mapping], attribute) -> float:
  """The share of ``rows`` that are bare answers (``bare_answers``). A steered model that lost
  its prose on an unseen story wording answers so (SmolLM2: 8% of v3, 0.2% of the held-out
  training wordings)."""
  return float(np.mean(bare_answers(rows, attribute))) if rows else 0.0


def with_bare_answer_rates(eval_dir: Any, attribute) -> dict[str, Any]:
  """The metrics document of ``eval_dir`` (``out_dir/eval``); an evaluation written before
  ``bare_answer_rate`` existed gains it for its story versions from their rows (``v3.jsonl``),
  and its metrics.json, report.md and plots are rewritten. Nothing is sampled."""
  path = fileio.as_path(eval_dir)
  doc = fileio.read_json(path / "metrics.json", "an evaluation's metrics")
  missing = [v for v, m in doc.get("versions", {}).items()
             if v in STORY_VERSIONS and "bare_answer_rate" not in m
             and (path / f"{v}.jsonl").exists()]
  for v in missing:
    rows = [row for _, row in fileio.read_jsonl(path / f"{v}.jsonl")]
    doc["versions"][v]["bare_answer_rate"] = bare_answer_rate(rows, attribute)
  if missing:
    report_lib.write_eval_files(path, doc["versions"], meta=doc.get("meta"),
                                plots=(path / "plots").exists())
  return doc


def steering_probabilities(sampler: Sampler, state, ids: Sequence[Sequence[int]],
                           encoder: Encoder, batch_size: int = 64) -> np.ndarray:
  """[P, K] float64: the exact steering-token distribution after each prompt (fixed-size chunks,
  one compile)."""
  length = pow2_bucket(max(len(x) for x in ids))
  probs = []
  batch = min(batch_size, next_pow2(len(ids)))
  steering_ids = [int(i) for i in encoder.steering_ids]
  for start in range(0, len(ids), batch):
    chunk = list(ids[start:start + batch])
    chunk = chunk + [chunk[-1]] * (batch - len(chunk))  # fixed shape: one compile
    input_ids, mask = left_pad(chunk, encoder.pad_id, length)
    probs.append(sampler.steering_distribution(state, input_ids, mask, steering_ids))
  return np.concatenate(probs)[:len(ids)].astype(np.float64)


def exact_distributions(sampler: Sampler, state, slots: Sequence[Mapping], encoder: Encoder,
                        batch_size: int = 64) -> dict[str, list[float]]:
  """occupation -> exact steering distribution [K], averaged over its slots' prompts (one forward
  per distinct prompt, weighted by how many slots use it)."""
  distinct = list(dict.fromkeys(s["prompt"] for s in slots))
  probs = steering_probabilities(sampler, state, encoder.encode_prompts(distinct), encoder,
                                 batch_size)
  return {o: (p / p.sum()).tolist() for o, p in _occupation_means(slots, distinct, probs).items()}


def _occupation_means(slots: Sequence[Mapping], distinct: Sequence[str],
                      probs: np.ndarray) -> dict[str, np.ndarray]:
  """occupation -> the mean of ``probs`` ([len(distinct), K], a row per distinct prompt) over its
  slots (a prompt counts as often as its slots use it)."""
  row = {p: i for i, p in enumerate(distinct)}
  sums: dict[str, np.ndarray] = {}
  counts: dict[str, int] = {}
  for s in slots:
    o = s["occupation"]
    sums[o] = sums.get(o, 0) + probs[row[s["prompt"]]]
    counts[o] = counts.get(o, 0) + 1
  return {o: sums[o] / counts[o] for o in sums}


def answer_probabilities(sampler: Sampler, state, prompts: Sequence[Sequence[int]],
                         encoder: Encoder, attribute, *, steered: bool, batch_size: int = 16,
                         end_of_turn: bool = True) -> np.ndarray:
  """The exact probability of each canonical answer, as the model samples it.

  For prompt p and category k: P(answer_k + end of turn | p) (unsteered), or
  sum_s P(s | p) P(answer_k + end of turn | p, s) over the K steering tokens s, with P(s | p)
  the softmax over the K steering logits that steered sampling draws from. The mass missing
  from 1 goes to anything else (other wordings, other lengths, no answer): the non-answers.
  ``end_of_turn=False`` leaves the end of turn out: the probability that the completion *starts*
  with answer_k, whatever follows (a story that opens with a bare category word).

  Args:
    prompts: P prompt id lists (chat template applied; steered: ``encoder.encode_prompts``, which
      end with the question under ``user_turn`` placement); encoder: their Encoder (end of turn,
      steering ids and suffix); attribute: the K categories (their ``answer`` texts).
  Returns:
    [P, K] float64, rows summing to at most 1.
  """
  answers = [encoder.completion_ids(c.answer) for c in attribute.categories]
  if not end_of_turn:
    answers = [a[:len(a) - len(encoder.end_ids)] for a in answers]
  k = len(answers)
  steer_ids = [int(i) for i in encoder.steering_ids] if steered else [None]
  rows = [(pi, si, ki) for pi in range(len(prompts)) for si in range(len(steer_ids))
          for ki in range(k)]
  seqs, starts = [], []
  for pi, si, ki in rows:
    steer = [] if steer_ids[si] is None else encoder.steering_head(steer_ids[si])
    head = list(prompts[pi]) + steer
    seqs.append(head + answers[ki])
    starts.append(len(head))
  length = pow2_bucket(max(len(x) for x in seqs))
  batch = min(batch_size, next_pow2(len(seqs)))
  logps = []
  for start in range(0, len(seqs), batch):
    chunk = list(range(start, min(start + batch, len(seqs))))
    chunk += [chunk[-1]] * (batch - len(chunk))  # fixed shape: one compile
    ids = np.full((batch, length), encoder.pad_id, np.int32)
    mask = np.zeros_like(ids)
    lmask = np.zeros(ids.shape, np.float32)
    for r, j in enumerate(chunk):
      ids[r, :len(seqs[j])], mask[r, :len(seqs[j])] = seqs[j], 1
      lmask[r, starts[j] - 1:len(seqs[j]) - 1] = 1.0  # the positions predicting the answer
    labels = np.concatenate([ids[:, 1:], np.full((batch, 1), encoder.pad_id, np.int32)], axis=1)
    real = min(batch, len(seqs) - start)
    logps.append(np.asarray(sampler.label_logps(state, ids, mask, labels, lmask))[:real])
  answer_p = np.exp(np.concatenate(logps).astype(np.float64)).reshape(len(prompts), -1, k)
  if not steered:
    return answer_p[:, 0]
  weights = steering_probabilities(sampler, state, prompts, encoder)  # [P, K steering tokens]
  return np.einsum("ps,psk->pk", weights, answer_p)


def answer_distributions(sampler: Sampler, state, slots: Sequence[Mapping], encoder: Encoder,
                         attribute, *, steered: bool) -> dict[str, list[float]]:
  """occupation -> the exact probabilities [K] of the canonical answers (``answer_probabilities``),
  averaged over its slots' prompts (one pass per distinct prompt, weighted by its slots)."""
  distinct = list(dict.fromkeys(s["prompt"] for s in slots))
  probs = answer_probabilities(sampler, state, encoder.encode_prompts(distinct), encoder,
                               attribute, steered=steered)
  return {o: np.clip(p, 0.0, 1.0).tolist()
          for o, p in _occupation_means(slots, distinct, probs).items()}


# --------------------------------------------------------------------------------------------------
# The whole evaluation


# The ``meta`` fields that, with the model and the prompts, fix the samples drawn.
SAMPLING_FIELDS = ("attribute", "categories", "steering", "steering_tokens", "steering_token_ids",
                   "stop_token_ids", "decoding", "rounds", "seed", "prompt_field", "prompt_format",
                   "system_prompt", "chat_template_kwargs", "steering_placement",
                   "prompt_example", "batch_size")


def _sampling_key(meta: Mapping[str, Any]) -> dict[str, Any]:
  return json.loads(json.dumps({k: meta.get(k) for k in SAMPLING_FIELDS}))


def earlier_samples(eval_dir: Any, meta: Mapping[str, Any]) -> dict[str, list[dict]]:
  """{version: rows} of an earlier evaluation under ``eval_dir`` (``out_dir/eval``) drawn with
  the sampling settings of ``meta`` (``SAMPLING_FIELDS``); {} where there is none or it differs.
  That it evaluated the same model is the caller's to know."""
  path = fileio.as_path(eval_dir)
  if not (path / "metrics.json").exists():
    return {}
  doc = fileio.read_json(path / "metrics.json", "an evaluation's metrics")
  if _sampling_key(doc.get("meta", {})) != _sampling_key(meta):
    return {}
  return {v: [row for _, row in fileio.read_jsonl(path / f"{v}.jsonl")]
          for v in doc.get("versions", {}) if (path / f"{v}.jsonl").exists()}


PARTIAL = "eval-partial"


def weights_fingerprint(state) -> str:
  """A crc32 of every floating-point array of ``state`` (this process's first shard of each):
  tells one model's weights from another's, e.g. a run's retrained weights from those an
  interrupted evaluation sampled."""
  import jax
  crc = 0
  for leaf in jax.tree.leaves(state):
    if not (hasattr(leaf, "dtype") and np.issubdtype(leaf.dtype, np.floating)):
      continue
    data = leaf.addressable_shards[0].data if hasattr(leaf, "addressable_shards") else leaf
    arr = np.ascontiguousarray(np.asarray(data))
    crc = zlib.crc32(f"{arr.dtype}{arr.shape}".encode(), crc)
    crc = zlib.crc32(arr.reshape(-1).view(np.uint8), crc)
  return f"{crc:08x}"


class _Partial:
  """``out_dir/eval-partial``: the rows of the versions an evaluation has finished, for a run
  stopped before ``eval/`` was written (main process only)."""

  def __init__(self, path, key: Mapping[str, Any]):
    self.path, self.key, self.timing = path, dict(key), {}

  @classmethod
  def open(cls, out_dir, sampling: Mapping[str, Any], fingerprint: str) -> "_Partial":
    path = fileio.as_path(out_dir) / PARTIAL
    part = cls(path, {"sampling": _sampling_key(sampling), "weights": fingerprint})
    index = path / "index.json"
    if index.exists():
      try:
        doc = fileio.read_json(index, "an interrupted evaluation's index")
      except InputError:
        doc = {}
      if {k: doc.get(k) for k in part.key} == part.key:
        part.timing = {v: t for v, t in doc.get("timing", {}).items()
                       if (path / f"{v}.jsonl").exists()}
    if not part.timing and path.exists():  # another model's or other settings' rows, or none
      path.rmtree()
    return part

  def rows(self) -> dict[str, list[dict]]:
    return {v: [row for _, row in fileio.read_jsonl(self.path / f"{v}.jsonl")]
            for v in self.timing}

  def add(self, version: str, rows: Sequence[Mapping], timing: Mapping[str, Any]) -> None:
    fileio.make_dirs(self.path)
    fileio.write_jsonl(self.path / f"{version}.jsonl", rows)
    self.timing[version] = dict(timing)
    fileio.write_json(self.path / "index.json", {**self.key, "timing": self.timing})

  def remove(self) -> None:
    self.path.rmtree(missing_ok=True)


def _sample_or_reuse(sampler, state, encoder, attribute, slots, version, config, targets,
                     earlier: Sequence[Mapping] | None) -> tuple[list[dict] | None, bool]:
  """(rows, reused): ``earlier``'s rows (their category dropped) where they answer exactly
  ``slots`` (occupation and prompt, in order), else freshly sampled ones. ``earlier`` is the
  first process's to hold; every process follows its choice (sampling is collective), and the
  others, which have no rows to reuse, get None."""
  reuse = distributed.main_says(earlier is not None and [
      (r.get("occupation"), r.get("prompt")) for r in earlier] == [
      (s["occupation"], s["prompt"]) for s in slots])
  if reuse:
    return (None if earlier is None else
            [{k: v for k, v in r.items() if k != "category"} for r in earlier]), True
  return sample_version(sampler, state, encoder, attribute, slots, version=version,
                        config=config, targets=targets), False


def _evaluate_version(version, sampler, state, encoder, attribute, records, config, judge,
                      earlier=None):
  """-> (metrics, rows, timing) of one test version; (None, None, None) on every process but the
  first (which alone judges and scores; sampling and the exact distributions are collective).
  ``earlier``: rows sampled before with the same model and settings, reused if they answer the
  same slots."""
  slots, targets = _group_records(records, version, config.prompt_field, config.rounds,
                                  attribute.num_categories)
  start = time.perf_counter()
  rows, reused = _sample_or_reuse(sampler, state, encoder, attribute, slots, version, config,
                                  targets, earlier)
  sampled = time.perf_counter()
  exact = answers = None
  if config.steering == "model":
    exact = exact_distributions(sampler, state, slots, encoder)
  if config.exact_answers and version not in STORY_VERSIONS and config.steering != "target":
    answers = answer_distributions(sampler, state, slots, encoder, attribute,
                                   steered=config.steering == "model")
  if not console.is_main_process():
    return None, None, None
  categorize(rows, attribute, story=version in STORY_VERSIONS, judge=judge, parser=config.parser)
  metrics = metrics_lib.evaluate_version(
      rows, targets, attribute.num_categories, n_bootstrap=config.n_bootstrap, seed=config.seed,
      exact=exact, answers=answers, categories=attribute.names, source=f"eval/{version}.jsonl")
  if version in STORY_VERSIONS:
    metrics["bare_answer_rate"] = bare_answer_rate(rows, attribute)
  timing = {"samples": len(rows), "sampling_s": round(sampled - start, 3),
            "samples_per_s": round(len(rows) / max(sampled - start, 1e-9), 2),
            "total_s": round(time.perf_counter() - start, 3), **({"reused": True} if reused else {})}
  return metrics, rows, timing


def _progress_line(version: str, m: Mapping, timing: Mapping) -> str:
  return (f"{version}: {timing['samples']} samples in {timing['sampling_s']:.1f} s, MAE "
          f"{m['mae']:.4f} (std {m['mae_std']:.4f}), unparsed {m['unparsed_rate']:.1%}"
          + (f", exact steering MAE {m['exact_mae']:.4f}" if "exact_mae" in m else "")
          + (f", exact answer MAE {m['exact_answer_mae']:.4f} (non-answer "
             f"{m['non_answer']:.1%})" if "exact_answer_mae" in m else ""))


def evaluate(model: nnx.Module, tokenizer, attribute, test_sets: Mapping[str, Sequence[Mapping]],
             out_dir: Any, *, config: EvalConfig = EvalConfig(), prompt_format: str = "chat",
             system_prompt: str = "default", chat_template_kwargs: Mapping[str, Any] | None = None,
             max_prompt_length: int | None = None, steering_placement: str = "assistant",
             judge=None, overwrite: bool = False, metadata: Mapping[str, Any] | None = None,
             progress: Callable[[str], None] | None = None, sampler: Sampler | None = None,
             mesh=None, reuse_samples_from: Any = None) -> dict[str, Any] | None:
  """Runs the evaluation and writes ``out_dir/eval`` (see the module docstring).

  Args:
    model: an ``nnx.Module`` (Llama contract), in eval mode.
    tokenizer: Hugging Face tokenizer (chat template; decodes responses).
    attribute: ``data.attributes.AttributeSpec`` (categories, synonyms, steering tokens).
    test_sets: version -> test records (``prompt``, ``occupation``, ``target``, ``pe_prompt``), e.g.
      ``data.build.build_dataset(name)["test_v2"]``.
    out_dir: run directory; results go to ``out_dir/eval``.
    config: versions, rounds, steering mode, decoding, seed, bootstrap.
    prompt_format: the run's ``data.prompt_format`` (chat template or the original's wrapping).
    system_prompt, chat_template_kwargs: the run's ``data.system_prompt`` and
      ``data.chat_template_kwargs`` (``data.chat.ChatFormat``), so that prompts are the training
      prompts byte for byte; ``config.system_prompt`` / ``config.chat_template_kwargs`` override
      them when set.
    max_prompt_length: the run's ``data.max_prompt_length`` (prompts truncated from the left as in
      training; default: the Encoder's 512).
    steering_placement: the run's ``data.steering_placement`` (where its steering token goes).
    judge: story judge for v3 (default: ``judges.RulesJudge()``).
    overwrite: replace an existing ``out_dir/eval``.
    metadata: extra JSON-serialisable facts recorded in ``meta`` (model path, dataset, ...).
    progress: optional callback receiving one line per finished version.
    sampler: a ``Sampler`` of the model's architecture to reuse (its compiled programs serve every
      model of that architecture); default: a new one, on ``mesh``.
    mesh: the devices to sample on (the model's own mesh, every device of every process for a
      multi-host evaluation: every process calls ``evaluate``; the first judges, scores and writes).
    reuse_samples_from: another evaluation's ``eval`` directory *of the same model* (the caller
      vouches for that): a version whose samples it drew with the same settings
      (``SAMPLING_FIELDS``) for the same prompts in the same order is scored from them, not
      sampled again (another dataset with the same questions and other targets); every row is
      what sampling here would give. Recorded in ``meta.reused_samples_from``.
  Returns:
    the metrics document written to eval/metrics.json: ``{"versions": {version: metrics},
    "meta": {decoding, steering, rounds, seed, judge, timing, ...}}``; None on the other processes.
  """
  final_dir = fileio.as_path(out_dir) / "eval"
  fileio.check_new_dir(final_dir, overwrite, "eval")
  versions = [str(v) for v in config.versions]
  missing = [v for v in versions if v not in test_sets]
  if missing:
    raise InputError(f"eval: test_sets: expected records for {', '.join(missing)}, got none")
  encoder = _encoder(tokenizer, attribute, config, prompt_format, system_prompt,
                     chat_template_kwargs, max_prompt_length, steering_placement)
  if encoder.chat.date_warning and progress is not None:
    progress(f"warning: {encoder.chat.date_warning}")
  if judge is None and any(v in STORY_VERSIONS for v in versions):
    judge = RulesJudge()
  graphdef, state = nnx.split(model)
  sampler = sampler if sampler is not None else Sampler(graphdef, mesh)
  earlier, partial, resumed = {}, None, {}
  if console.is_main_process():  # the others follow its choice of what to reuse
    sampling = _meta(encoder, attribute, config, prompt_format, judge, {}, None)
    if reuse_samples_from is not None:
      earlier = earlier_samples(reuse_samples_from, sampling)
    partial = _Partial.open(out_dir, sampling, weights_fingerprint(state))
    resumed = partial.rows()
  results, rows_by_version, timing = {}, {}, {}
  for version in versions:
    source = resumed.get(version, earlier.get(version))
    results[version], rows_by_version[version], timing[version] = _evaluate_version(
        version, sampler, state, encoder, attribute, test_sets[version], config, judge, source)
    if partial is None:
      continue
    if version in resumed and timing[version].get("reused"):
      timing[version] = {**partial.timing[version], "resumed": True}
    else:  # sampled here (or reused from another evaluation)
      partial.add(version, rows_by_version[version], timing[version])
    if progress is not None:
      progress(_progress_line(version, results[version], timing[version]))
  if not console.is_main_process():
    return None
  meta = _meta(encoder, attribute, config, prompt_format, judge, timing, metadata)
  if reuse_samples_from is not None and any(t.get("reused") for t in timing.values()):
    meta["reused_samples_from"] = str(reuse_samples_from)
  with fileio.atomic_dir(final_dir, overwrite=overwrite, what="eval") as tmp:
    for version, rows in rows_by_version.items():
      fileio.write_jsonl(tmp / f"{version}.jsonl", rows)
    report_lib.write_eval_files(tmp, results, meta=meta, plots=config.plots)
  partial.remove()
  return {"versions": results, "meta": meta}


def _encoder(tokenizer, attribute, config: EvalConfig, prompt_format, system_prompt,
             chat_template_kwargs, max_prompt_length, steering_placement) -> Encoder:
  """The run's Encoder (its prompt settings; the evaluation config's where it sets them)."""
  if config.system_prompt is not None:
    system_prompt = config.system_prompt
  if config.chat_template_kwargs is not None:
    chat_template_kwargs = config.chat_template_kwargs
  lengths = ({} if max_prompt_length is None else  # the run's own prompt truncation
             {"max_prompt_length": int(max_prompt_length),
              "max_length": max(1024, int(max_prompt_length) + 1)})
  return Encoder(tokenizer, attribute=attribute if config.steering != "none" else None,
                 prompt_format=str(prompt_format), system_prompt=str(system_prompt),
                 chat_template_kwargs=dict(chat_template_kwargs or {}),
                 steering_placement=str(steering_placement), **lengths)


def _meta(encoder: Encoder, attribute, config: EvalConfig, prompt_format, judge, timing,
          metadata) -> dict[str, Any]:
  """metrics.json's ``meta``: how the samples were drawn, prompted, judged and timed."""
  return {
      "attribute": attribute.name, "categories": attribute.names,
      "steering": str(config.steering), "steering_tokens": attribute.steering_tokens,
      "steering_token_ids": (None if encoder.steering_ids is None
                             else [int(i) for i in encoder.steering_ids]),
      "stop_token_ids": encoder.stop_ids, "decoding": config_to_dict(config.decode),
      "rounds": config.rounds, "seed": config.seed, "prompt_field": config.prompt_field,
      "prompt_format": str(prompt_format), "system_prompt": encoder.chat.system_prompt,
      "chat_template_kwargs": dict(encoder.chat.template_kwargs),
      "steering_placement": encoder.placement,
      "prompt_example": {**encoder.chat.example(),
                         "ids": encoder.prompt_ids(encoder.chat.example()["question"])},
      "n_bootstrap": config.n_bootstrap,
      "batch_size": config.batch_size, "judge": type(judge).__name__ if judge is not None else None,
      "timing": timing, **dict(metadata or {})}
