"""One dataset's miniature benchmark (``Demo``): the biased base, every method trained over its
learning-rate grid and selected by one rule, and each evaluated with one decoding configuration."""

from __future__ import annotations

import os
import shutil
import time
from typing import Any, Callable, Sequence

from flax import nnx

from distfair_jax import console
from distfair_jax import fileio
from distfair_jax import memory
from distfair_jax.data import build as build_lib
from distfair_jax.data.tokenizer import load_tokenizer_dir
from distfair_jax.demo import analyses
from distfair_jax.demo.base_data import stereotyped_records
from distfair_jax.demo.configs import run_config
from distfair_jax.demo.selection import cached_heldout_mae, passes, select
from distfair_jax.demo.settings import ABLATION, ABLATIONS, METHODS, STEERED, DemoSettings, scaled
from distfair_jax.demo.tables import _summary, occupation_plot
from distfair_jax import config as C
from distfair_jax.evaluation import evaluate as eval_lib
from distfair_jax.evaluation.sample import Sampler
from distfair_jax.model.modeldir import PARAMS_DIR
from distfair_jax.train.preemption import Preempted
from distfair_jax.train.rundir import FINAL, RunDir, open_model_dir
from distfair_jax.train.trainer import train

# Where a later seed's rates come from (``rates_from``): never re-selected (the seed varies alone).
FIRST_SEED = "the first seed"


def same_model_eval(dataset_dir: str, name: str, run: str) -> str | None:
  """Another dataset's ``<name>/eval`` (a sibling of ``dataset_dir``) of this run's very model (a
  given model's zero-shot: gender_real_us and gender_even_us ask the same questions), whose samples
  ``evaluate`` reuses where they were drawn the same way for the same prompts; None where there is
  none."""
  parent, own = os.path.split(dataset_dir)
  for other in sorted(os.listdir(parent)):
    path = os.path.join(parent, other, name, "eval")
    if other == own or not os.path.exists(os.path.join(path, "metrics.json")):
      continue
    recorded = fileio.read_json(os.path.join(path, "metrics.json")).get("meta", {}).get("run")
    if recorded and os.path.realpath(recorded) == os.path.realpath(run):
      return path
  return None


class Demo:
  """One dataset's miniature benchmark under ``run_dir/<dataset>``."""

  def __init__(self, dataset: str, run_dir: str, *, settings: DemoSettings, seed: int,
               tokenizer_dir: str, progress: bool = True, base_model: str | None = None,
               ablations: bool = True, rates_from: str | None = None):
    spec = build_lib.resolve_spec(dataset)
    settings = scaled(settings, len(spec.occupations))
    # A user's YAML spec: its own name for the directory and the tables, its absolute path for the
    # runs' configs (data.spec).
    self.dataset, self.s, self.seed, self.progress = spec.name, settings, seed, progress
    # The ablations (kl_only, kto_only) trained and evaluated here too, or ours alone.
    self.methods = METHODS if ablations else tuple(m for m in METHODS if m not in ABLATIONS)
    self.spec_path = None if spec.source == "builtin" else os.path.abspath(spec.source)
    self.dir = os.path.join(run_dir, self.dataset)
    os.makedirs(self.dir, exist_ok=True)
    self.tokenizer_dir = tokenizer_dir
    # The first seed's run directory, whose selection of this dataset fixes the rates here
    # (``tune_first_seed``); None: this seed selects.
    self.rates_from = rates_from
    # A given model (a ``distfair convert`` directory) instead of the biased base trained here.
    self.base_model = None if base_model is None else os.path.abspath(base_model)
    self.data = build_lib.build_dataset(
        spec, rows_per_occupation=settings.rows_per_occupation, test_rounds=settings.rounds,
        seed=seed, stories_per_occupation=settings.story_rows_per_occupation,
        pair_stories_per_occupation=settings.pair_story_rows_per_occupation)
    self.spec = self.data.spec
    self.attribute = self.spec.attribute
    self.timings: dict[str, float] = self._load_json("timings.json")
    # {stage: its peak and remaining resident GiB, and what release() handed back}
    self.memory: dict[str, dict] = self._load_json("memory.json")
    self.tokenizer = load_tokenizer_dir(tokenizer_dir)
    self._samplers: dict = {}

  # -- bookkeeping --------------------------------------------------------------------------------

  def _load_json(self, name: str) -> dict:
    path = os.path.join(self.dir, name)
    return fileio.read_json(path) if os.path.exists(path) else {}

  def _save_json(self, name: str, data: Any) -> None:
    fileio.write_json(os.path.join(self.dir, name), data, indent=1)

  def _timed(self, key: str, fn: Callable[[], Any]) -> Any:
    """Runs ``fn`` and records its wall time under ``key`` the first time it completes. A training
    stage stopped by SIGTERM (``Preempted``: its checkpoint holds the steps so far) keeps its time
    under ``"<key> (before resuming)"``, added to the resumed attempt's when that completes."""
    start = time.perf_counter()
    earlier = f"{key} (before resuming)"
    memory.reset_peak()
    try:
      out = fn()
    except Preempted:
      if key not in self.timings:
        self.timings[earlier] = round(self.timings.get(earlier, 0.0) +
                                      time.perf_counter() - start, 1)
        self._save_json("timings.json", self.timings)
      raise
    self._release(key, record=key not in self.timings)
    if key not in self.timings:
      self.timings[key] = round(time.perf_counter() - start + self.timings.pop(earlier, 0.0), 1)
      self._save_json("timings.json", self.timings)
    return out

  def _release(self, key: str, *, record: bool) -> None:
    """Hands back the host memory a finished piece of work left (``memory.release``: one process
    trains and evaluates dozens of models); ``record``: the first time ``key`` completes, notes in
    memory.json the peak resident size during it, what stayed resident after it and how much was
    released."""
    gib = lambda n: round(n / 2**30, 2)
    peak = memory.peak_resident_bytes()
    freed = memory.release()
    if not record:
      return
    self.memory[key] = {"peak_gib": gib(peak), "resident_gib": gib(memory.resident_bytes()),
                        "released_gib": gib(freed)}
    self._save_json("memory.json", self.memory)

  def sampler(self, model):
    """(a Sampler shared by every model of this architecture, the model's state)."""
    graphdef, state = nnx.split(model)
    if graphdef not in self._samplers:
      self._samplers[graphdef] = Sampler(graphdef)
    return self._samplers[graphdef], state

  # -- training -----------------------------------------------------------------------------------

  def train_base(self) -> str:
    """The biased base model (stage ``ift`` on stereotyped records, from random weights); returns
    its run directory (a given ``base_model``: that directory, nothing trained)."""
    if self.base_model:
      return self.base_model
    s = self.s
    records = stereotyped_records(self.spec, rows_per_occupation=s.base_rows_per_occupation,
                                  stories_per_occupation=s.base_stories_per_occupation,
                                  share=s.stereotype_share, seed=self.seed)
    run = os.path.join(self.dir, "base")
    cfg = run_config(self, run, ["ift"], lr=s.base_lr, sft_epochs=s.base_epochs, heldout_fraction=0.0)
    self._timed("base", lambda: train(cfg, records={"ift": records}))
    return run

  def _base_params(self) -> str | None:
    if self.base_model:
      return None  # the model config's checkpoint
    return os.path.join(self.dir, "base", "ift", FINAL, PARAMS_DIR)

  def train_candidates(self, name: str, stages: list[str], lrs: Sequence[float], *,
                       ablation: str = "full", init_from: str | None = None, steered: bool,
                       kl_pairs: str = "shifted"):
    """Trains ``stages`` at each learning rate of the grid (the last stage varies; earlier ones are
    copied from ``init_from``); returns (best lr, its run directory, {lr: held-out exact MAE}).
    A rate carried over from another dataset (``rates`` or ``tune_on``, ``_rate_source``) that
    fails the selection's held-out checks here (``selection.passes``: non-answer mass, stories)
    is not trusted: the rest of the grid is trained too and the rule selects among them all (a
    later seed's rate stays fixed: the seed is what varies)."""
    grid = tuple(float(lr) for lr in lrs)
    source = self._rate_source(name)
    sft_lr = None
    if init_from is not None:  # earlier stages were trained at the selected rate
      sft_lr = RunDir(init_from).read_config().sft.optim.learning_rate
    scores, non_answer, bare, failed, runs = {}, {}, {}, {}, {}
    nll = self.s.nll_weight if "hybrid" in stages else 0.0  # stage 2's runs say their NLL term

    def candidate(lr: float) -> None:
      run = os.path.join(self.dir, "runs", f"{name}_lr{lr:g}" + (f"_nll{nll:g}" if nll else ""))
      if init_from is not None:
        for prev in stages[:-1]:
          if not os.path.exists(os.path.join(run, prev)):
            shutil.copytree(os.path.join(init_from, prev), os.path.join(run, prev))
      cfg = run_config(self, run, stages, lr=lr, ablation=ablation, sft_lr=sft_lr,
                       base_params=self._base_params(), kl_pairs=kl_pairs)
      self._timed(f"{name}@{lr:g}", lambda: train(cfg, records=self.data.records))
      scores[lr], non_answer[lr], bare[lr], failed[lr] = self._timed(
          f"{name}@{lr:g} held-out", lambda: cached_heldout_mae(self, run, steered=steered))
      runs[lr] = run
      console.log(f"[{self.dataset}] {name} lr={lr:g}: held-out exact answer MAE "
                  f"{scores[lr]:.4f} (non-answer {non_answer[lr]:.1%}"
                  + ("" if bare[lr] is None else f"; bare answers to story prompts "
                     f"{bare[lr]:.1%}")
                  + ("" if failed[lr] is None else f"; sampled stories failed "
                     f"{failed[lr]:.1%}") + ")")

    known = lambda d: {lr: v for lr, v in d.items() if v is not None}
    if source is None:
      for lr in grid:
        candidate(lr)
    else:
      lr, what = source
      console.log(f"[{self.dataset}] {name}: the rate {what}, {lr:g}")
      candidate(lr)
      rest = [x for x in grid if x != lr]
      if (what != FIRST_SEED and rest and
          not passes(lr, non_answer, known(bare), known(failed))):
        console.log(f"[{self.dataset}] {name}: {lr:g} fails the held-out checks here; the rest "
                    f"of the grid {rest} too")
        for x in rest:
          candidate(x)
    best = select(scores, non_answer, known(bare), known(failed))
    return best, runs[best], {lr: {"mae": scores[lr], "non_answer": non_answer[lr],
                                   "story_bare_answer": bare[lr],
                                   **({} if failed[lr] is None else
                                      {"story_failed": failed[lr]})} for lr in runs}

  def _grid(self, name: str, lrs: Sequence[float]) -> tuple[float, ...]:
    """The rates ``train_candidates`` starts with: ``lrs``, or the one of ``_rate_source``."""
    source = self._rate_source(name)
    return tuple(float(lr) for lr in lrs) if source is None else (source[0],)

  def _rate_source(self, name: str) -> tuple[float, str] | None:
    """(rate, where it came from) for ``name`` where it is not selected here: fixed beforehand
    (``rates``), else the one already selected by the first seed on this dataset
    (``rates_from``), else by ``tune_on`` (another dataset of this run directory, trained
    first); None: the grid."""
    fixed = dict(self.s.rates).get(name)
    if fixed is not None:
      return float(fixed), "given (--rates)"
    sources = []
    if self.rates_from is not None:
      sources.append((os.path.join(self.rates_from, self.dataset), FIRST_SEED))
    tune_on = self.s.tune_on
    if tune_on is not None and tune_on != self.dataset:
      sources.append((os.path.join(os.path.dirname(self.dir), tune_on), tune_on))
    for where, what in sources:
      chosen = os.path.join(where, "selection.json")
      lr = fileio.read_json(chosen).get(name, {}).get("lr") if os.path.exists(chosen) else None
      if lr is not None:
        return float(lr), (FIRST_SEED if what == FIRST_SEED else f"selected on {what}")
    return None

  def model(self, run: str):
    """The final model of a run (what ``distfair eval RUN`` evaluates), LoRA folded in; the
    given base model itself for ``run == base_model`` (``train.rundir.open_model_dir``)."""
    return open_model_dir(run).model

  # -- evaluation ---------------------------------------------------------------------------------

  def evaluate_method(self, method: str, run: str, *, name: str | None = None,
                      tests: dict | None = None, versions: Sequence[str] | None = None,
                      temperature: float = 1.0, top_p: float = 1.0) -> dict:
    """Evaluates ``run`` as ``method`` into ``<dataset>/<name or method>/eval`` (reused when
    there): the dataset's own test sets, or ``tests``; the one decoding configuration unless a
    sweep asks for another."""
    out_dir = os.path.join(self.dir, name or method)
    path = os.path.join(out_dir, "eval", "metrics.json")
    if os.path.exists(path):  # reused when it evaluated this run (a new selection re-evaluates)
      doc = fileio.read_json(path)  # the same run reached through another path (a symlink) too
      recorded = doc.get("meta", {}).get("run")
      if recorded and os.path.realpath(recorded) == os.path.realpath(run):
        return eval_lib.with_bare_answer_rates(os.path.dirname(path), self.attribute)
      self.timings.pop(f"eval:{name or method}", None)  # another model's time
    s = self.s
    versions = list(versions or s.versions)
    cfg = C.EvalConfig(
        versions=versions, rounds=s.rounds,
        steering="model" if method in STEERED else "none",
        prompt_engineering=method == "prompt_engineering",
        decode=C.DecodeConfig(temperature=temperature, top_p=top_p, top_k=0,
                              max_new_tokens=s.answer_max_new_tokens,
                              story_max_new_tokens=s.story_max_new_tokens),
        seed=self.seed, n_bootstrap=s.n_bootstrap)
    if tests is None:
      tests = {v: self.data.records[f"test_{v}"] for v in versions}
    model = self.model(run)
    sampler, _ = self.sampler(model)
    earlier = same_model_eval(self.dir, name or method, run)
    if earlier is not None:
      console.log(f"[{self.dataset}] {name or method}: the samples of {earlier} where they answer "
                  "the same prompts (the same model, other targets)")
    return self._timed(f"eval:{name or method}", lambda: eval_lib.evaluate(
        model, self.tokenizer, self.attribute, tests, out_dir, config=cfg, overwrite=True,
        metadata={"dataset": self.dataset, "method": method, "run": os.path.abspath(run),
                  **({"base_model": self.base_model} if self.base_model else {})},
        max_prompt_length=s.max_length - 16, steering_placement=s.steering_placement,
        sampler=sampler, reuse_samples_from=earlier))

  def _stage2(self, selection: dict, sft_lr: float, ift_lr: float) -> dict[str, str]:
    """The stage-2 methods (ours, the ablations, DPO) trained and selected; {method: run}."""
    s = self.s
    trained = {}
    sft_dir = os.path.join(self.dir, "runs", f"sft_lr{sft_lr:g}")
    ift_dir = os.path.join(self.dir, "runs", f"ift_lr{ift_lr:g}")
    for method in (m for m in STEERED if m in self.methods):
      console.log(f"[{self.dataset}] {method}: stage 2 ({ABLATION[method]}), lr grid "
                  f"{list(s.stage2_lrs)}")
      lr, run, scores = self.train_candidates(method, ["sft", "hybrid"], s.stage2_lrs,
                                              ablation=ABLATION[method], init_from=sft_dir,
                                              steered=True)
      selection[method] = {"lr": lr, "heldout_mae": scores, "sft_lr": sft_lr}
      trained[method] = run
    dpo_lrs = s.stage2_lrs if s.dpo_lrs is None else s.dpo_lrs
    console.log(f"[{self.dataset}] dpo: from IFT, lr grid {list(dpo_lrs)}")
    lr, run, scores = self.train_candidates("dpo", ["ift", "dpo"], dpo_lrs, init_from=ift_dir,
                                            steered=False)
    selection["dpo"] = {"lr": lr, "heldout_mae": scores, "ift_lr": ift_lr}
    trained["dpo"] = run
    return trained

  def run(self) -> dict[str, dict]:
    """Trains and evaluates every method; returns ``{method: {version: summary}}``."""
    s = self.s
    console.log(f"[{self.dataset}] " + (f"base model {self.base_model} (given: nothing trained)"
                                        if self.base_model else "biased base model"))
    base = self.train_base()
    selection: dict[str, Any] = self._load_json("selection.json")
    console.log(f"[{self.dataset}] ours: stage 1 (SFT with steering tokens), lr grid "
                f"{list(s.sft_lrs)}")
    sft_lr, _, sft_scores = self.train_candidates("sft", ["sft"], s.sft_lrs, steered=True)
    selection["sft"] = {"lr": sft_lr, "heldout_mae": sft_scores}
    console.log(f"[{self.dataset}] ift: lr grid {list(s.sft_lrs)}")
    ift_lr, ift_run, ift_scores = self.train_candidates("ift", ["ift"], s.sft_lrs, steered=False)
    selection["ift"] = {"lr": ift_lr, "heldout_mae": ift_scores}
    trained = {"zero_shot": base, "prompt_engineering": base, "ift": ift_run,
               **self._stage2(selection, sft_lr, ift_lr)}
    self._save_json("selection.json", {k: {kk: ({str(a): b for a, b in vv.items()}
                                                if isinstance(vv, dict) else vv)
                                            for kk, vv in v.items()} for k, v in selection.items()})
    results = {}
    for method in self.methods:
      console.log(f"[{self.dataset}] evaluating {method}")
      doc = self.evaluate_method(method, trained[method])
      results[method] = {v: _summary(m) for v, m in doc["versions"].items()}
    self.trained, self.selection = trained, selection
    occupation_plot(self.dir, self.methods, "v2", os.path.join(self.dir, "occupations_v2.png"))
    return results

  # -- the paper's further analyses ----------------------------------------------------------------

  def out_of_distribution(self) -> dict[str, dict]:
    """``analyses.out_of_distribution``."""
    return analyses.out_of_distribution(self)

  def kl_pairs_variant(self) -> dict[str, dict]:
    """``analyses.kl_pairs_variant``."""
    return analyses.kl_pairs_variant(self)

  def decoding_sweep(self) -> dict[str, dict]:
    """``analyses.decoding_sweep``."""
    return analyses.decoding_sweep(self)
