"""The miniature benchmark behind ``distfair demo``: the whole method, its baselines and ablations, on
the built-in tiny model, offline, on a CPU.

For each dataset:

1. **A biased base model** stands in for an off-the-shelf LLM: the tiny Llama (random init) is trained
   on *stereotyped* data (``stereotyped_records``): every occupation's answers skewed to one category
   (gender: the occupation's majority sex; race and sentiment: a fixed stereotype per sector), well
   beyond the real statistics, over every question wording (training, v1 and v2) plus short templated
   stories that follow the same stereotype. Like the LLMs in the paper, it then answers fluently, with
   the wrong distribution. (It has seen the test wordings, as a real LLM has seen language like them;
   the fine-tuning methods below have not.)
2. **Methods**, all from that base model and all evaluated with one decoding configuration:
   ``zero_shot`` (the base model), ``prompt_engineering`` (the target stated in the prompt), ``ift``
   (SFT on answers allocated per target), ``dpo`` (from IFT), ``ours`` (SFT with steering tokens, then
   KTO + steering KL), and the ablations ``kl_only`` and ``kto_only`` (same SFT, stage 2 with one term).
   Every method's fine-tuning data holds story rows besides the attribute answers
   (``story_rows_per_occupation``: v3-style prompts of the training wordings, templated stories of
   the allocated category), so that the fine-tuned models keep writing stories and v3 measures
   something; a model this small does not carry an answer-only fine-tuning over to stories.
3. **Fair comparison**: IFT and our SFT run the same number of optimizer steps on the same rows, DPO and
   every stage-2 variant the same number of steps on the same pairs; every trained stage takes its
   learning rate from one grid by one rule (``select``), on the held-out split of the *training*
   prompts (never test prompts): the lowest exact answer MAE, the K canonical answers'
   probabilities read from the logits (summed over the steering tokens for steered models) with
   the mass on anything else counted as error, never above 20% non-answer mass where a rate with
   less exists.
4. **Evaluation** on v1 (held-out wording), v2 (the attribute question) and v3 (stories, rules judge):
   the sampled MAE with its bias-corrected bootstrap interval, the exact answer MAE and non-answer
   mass of every method, the exact steering MAE of the steered ones, and every version's unparsed
   rate. ``--seeds 0,1,2`` repeats the whole demo per seed (``RUN_DIR/seed<N>``) and reports mean
   and standard deviation over them.

``--model DIR`` starts every method from a given converted model instead of step 1 (``REAL``: LoRA,
the model's own tokenizer and chat template, smaller training sets; the test protocol unchanged).

Everything goes under one run directory; a rerun reuses finished stages, selections and evaluations.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Any, Callable, Sequence

import numpy as np

from distfair_jax import config as C
from distfair_jax import console
from distfair_jax import fileio
from distfair_jax.errors import InputError

METHODS = ("zero_shot", "prompt_engineering", "ift", "dpo", "ours", "kl_only", "kto_only")
STEERED = ("ours", "kl_only", "kto_only")
ABLATIONS = ("kl_only", "kto_only")
ABLATION = {"ours": "full", "kl_only": "kl_only", "kto_only": "kto_only"}


@dataclasses.dataclass(frozen=True)
class DemoSettings:
  """Sizes of the miniature benchmark (``DEFAULT`` and ``QUICK`` below)."""
  rows_per_occupation: int = 48        # fine-tuning rows per occupation (SFT / IFT / KTO / DPO)
  # Story rows per occupation in every method's fine-tuning data (``data.stories``; v3-style
  # prompts, templated stories of the allocated category): without them a model this small,
  # fine-tuned on one-word answers only, forgets how to write a story and answers v3 with a bare
  # category word (all unparsed), so v3 would measure nothing.
  story_rows_per_occupation: int = 16
  # How many of them also become stage 2's and DPO's pairs (None: all; ``data.pair_story_rows_
  # per_occupation``): a packed story pair costs ~8 answer pairs, and stage 2 has only to keep the
  # stories SFT taught.
  pair_story_rows_per_occupation: int | None = None
  base_rows_per_occupation: int = 80   # stereotyped attribute answers per occupation
  base_stories_per_occupation: int = 24
  stereotype_share: float = 0.95       # the base model's majority share
  base_epochs: int = 4
  base_lr: float = 3e-3
  sft_epochs: int = 2
  stage2_epochs: int = 2
  batch_size: int = 16                 # SFT / IFT rows; stage 2: 16 rows = 8 (desirable, undesirable) pairs; DPO 8 pairs
  sft_batch_size: int | None = None    # SFT / IFT rows when not batch_size
  # One grid for every trained method (SFT, IFT, each stage 2, DPO), chosen by one rule
  # (``Demo.select``): 10x and 100x below the rates that used to be the only ones.
  sft_lrs: tuple[float, ...] = (1e-5, 1e-4, 3e-4, 1e-3, 3e-3)
  stage2_lrs: tuple[float, ...] = (1e-5, 1e-4, 3e-4, 1e-3, 3e-3)
  beta: float = 0.1
  rounds: int = 100
  versions: tuple[str, ...] = ("v1", "v2", "v3")
  max_length: int = 160
  n_bootstrap: int = 1000
  story_max_new_tokens: int = 80
  answer_max_new_tokens: int = 8       # v1 / v2 answers
  heldout_fraction: float = 0.15
  # Fine-tuning: full (lora_rank 0, the tiny model) or LoRA adapters on ``lora_targets`` (the
  # same adapters for every trained method).
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_dropout: float = 0.05
  lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
  # Stage 1 (SFT / IFT) on length-grouped batches too (stage 2 and DPO are, with stories): a
  # story row pads a batch of one-word answers to ~2x their length.
  sft_group_by_length: bool = False
  # The selection's story check, besides the bare-answer mass: this many sampled completions per
  # held-out story prompt, judged as v3 is (0: the bare-answer mass alone).
  story_check_rounds: int = 0
  # Training batches' padded lengths (``data.length_buckets``): the miniature's figures were
  # measured with powers of two.
  length_buckets: str = "pow2"
  # Where the steered methods' steering token goes (``data.steering_placement``).
  steering_placement: str = "assistant"
  # The dataset whose selected learning rates the others reuse as one-point grids, where its
  # selection.json exists in the same run directory (run first); None: every dataset selects
  # from the grids.
  tune_on: str | None = None
  # The paper's further analyses (out of distribution, the decoding sweep, kl_pairs: reference).
  analyses: bool = True


# The sizes above are per occupation for a table of at least this many (gender_real_us has 14): a
# dataset with fewer occupations (a user's own, say 6) gets proportionally more rows per occupation,
# so that every model trains for about as many steps as on the built-in datasets.
REFERENCE_OCCUPATIONS = 14


def scaled(settings: DemoSettings, num_occupations: int) -> DemoSettings:
  """``settings`` with the per-occupation row counts scaled up for a table of fewer than
  ``REFERENCE_OCCUPATIONS`` occupations (the built-in datasets are unchanged)."""
  factor = -(-REFERENCE_OCCUPATIONS // max(int(num_occupations), 1))
  if factor <= 1:
    return settings
  return dataclasses.replace(
      settings, rows_per_occupation=settings.rows_per_occupation * factor,
      story_rows_per_occupation=settings.story_rows_per_occupation * factor,
      pair_story_rows_per_occupation=(None if settings.pair_story_rows_per_occupation is None else
                                      settings.pair_story_rows_per_occupation * factor),
      base_rows_per_occupation=settings.base_rows_per_occupation * factor,
      base_stories_per_occupation=settings.base_stories_per_occupation * factor)


DEFAULT = DemoSettings()
QUICK = DemoSettings(rows_per_occupation=24, story_rows_per_occupation=0,
                     base_rows_per_occupation=32, base_stories_per_occupation=0,
                     base_epochs=3, sft_epochs=3, stage2_epochs=1, batch_size=16, sft_lrs=(3e-3,),
                     stage2_lrs=(1e-3,), rounds=20, versions=("v2",), n_bootstrap=200, max_length=96)
# A given instruct model (``distfair demo --model CKPT``): no base training, LoRA rank 32, alpha
# 16, dropout 0.05 (the paper's 1-2B recipe) on every linear projection (``all-linear``; the
# paper's q and v with ``--lora-targets q_proj,v_proj``: on SmolLM2-135M-Instruct in these few
# steps q/v adapters learn only the marginal, P(male) 0.51-0.55 for every occupation, see
# benchmarks/adapter_curve.py), the same adapters for every trained method, the test protocol
# unchanged (v1-v3, 100 rounds), and training cut for a 135M-parameter model on a 2-core CPU:
# 16 attribute rows + 16 story rows per occupation (the paper: 100 attribute rows; with 4 story
# rows SmolLM2's SFT model left 54% of v3 unparsed, with 16, 12%), of which 4 per occupation
# are stage 2's and DPO's story pairs (with all 16, story pair batches took ~20 s a step against
# ~2.6 s for answer pairs, 35 minutes a stage-2 run), SFT and stage 2 two epochs
# (the paper: 3), two-point grids (stage 2 and DPO: 1e-4 and 5e-4, the rate at which all-linear
# adapters calibrated SmolLM2 in 126 stage-2 steps), stories of at most 64 new tokens, the
# selection's story check sampling 4 stories per held-out story prompt, and no further
# analyses, every stage on length-grouped batches (half the rows are stories). Batches as the
# paper's: SFT 4 rows, stage 2 8 rows (4 pairs), DPO 4 pairs; with 16-row SFT batches the 35 steps
# at 1e-4 left SmolLM2's steered answers 99.4% non-answer on the held-out prompts. Batches pad
# to 1.5x steps too (``fine``): with length grouping, the SFT step fell from 7.3 s to ~4.4 s.
# The grids run on gender_real_us; the other datasets reuse its selected rates (``tune_on``): a
# dataset in about half the time.
REAL = DemoSettings(rows_per_occupation=16, story_rows_per_occupation=16, sft_epochs=2,
                    stage2_epochs=2, batch_size=8, sft_batch_size=4, sft_lrs=(1e-4, 1e-3),
                    stage2_lrs=(1e-4, 5e-4),
                    rounds=100, max_length=256, story_max_new_tokens=64, answer_max_new_tokens=16,
                    lora_rank=32, lora_alpha=16.0, lora_dropout=0.05, lora_targets=("all-linear",),
                    sft_group_by_length=True, story_check_rounds=4, analyses=False,
                    pair_story_rows_per_occupation=4, length_buckets="fine",
                    tune_on="gender_real_us")


def settings_for(*, quick: bool, model: str | None, lora_targets: Sequence[str] | None = None,
                 steering_placement: str | None = None) -> DemoSettings:
  """The sizes ``distfair demo`` runs with: ``DEFAULT`` / ``QUICK`` on the tiny model, ``REAL``
  from a given model, ``QUICK`` with ``REAL``'s fine-tuning and lengths for ``--quick --model``;
  ``lora_targets`` replaces the adapters' targets (a given model only); ``steering_placement``
  the steering token's place."""
  placed = lambda s: (s if steering_placement is None else
                      dataclasses.replace(s, steering_placement=steering_placement))
  if model is None:
    if lora_targets:
      raise InputError("demo: --lora-targets: expected --model (the built-in tiny model is "
                       "fine-tuned in full)")
    return placed(QUICK if quick else DEFAULT)
  settings = REAL if not quick else dataclasses.replace(
      QUICK, lora_rank=REAL.lora_rank, lora_alpha=REAL.lora_alpha,
      lora_dropout=REAL.lora_dropout, lora_targets=REAL.lora_targets,
      max_length=REAL.max_length, answer_max_new_tokens=REAL.answer_max_new_tokens,
      length_buckets=REAL.length_buckets, analyses=False)
  if lora_targets:
    settings = dataclasses.replace(settings, lora_targets=tuple(lora_targets))
  return placed(settings)


# ------------------------------------------------------------------------------------------------
# The biased base model's data


_SECTOR_STEREOTYPE = {  # race / sentiment category index per sector (synthetic stereotypes)
    "race": {"Technology & Engineering": 3, "Healthcare & Medicine": 1},
    "sentiment": {"Healthcare & Medicine": 1, "Technology & Engineering": 0,
                  "Education & Research": 0, "Finance & Business": 2,
                  "Manufacturing & Construction": 1},
}


def stereotype(spec, occupation: str, share: float) -> np.ndarray:
  """The base model's skewed answer distribution [K] for ``occupation``: ``share`` on the stereotyped
  category (gender: the occupation's majority sex by the real figures; race / sentiment: a fixed
  category per sector; a user's own attribute: the category its target gives the most, the first on
  a tie, exaggerated as the gender stereotype exaggerates the majority), the rest spread evenly."""
  attr = spec.attribute
  k = attr.num_categories
  if (attr.name == "gender" and spec.table is not None and occupation in spec.table.names and
      spec.table.get(occupation).male is not None):
    major = int(np.argmax(spec.table.real_gender_target(occupation)))
  elif attr.name not in _SECTOR_STEREOTYPE:
    major = int(np.argmax(spec.target(occupation)))
  else:
    sector = spec.table.get(occupation).sector if spec.table is not None else ""
    major = _SECTOR_STEREOTYPE.get(attr.name, {}).get(sector, 0)
  p = np.full((k,), (1.0 - share) / max(k - 1, 1))
  p[major] = share if k > 1 else 1.0
  return p / p.sum()


def stereotyped_records(spec, *, rows_per_occupation: int, stories_per_occupation: int, share: float,
                        seed: int) -> list[dict]:
  """IFT-style records (prompt, occupation, category, response, target) of the stereotyped base data."""
  from distfair_jax.data import build as build_lib
  from distfair_jax.data import templates as templates_lib
  attr, tpl = spec.attribute, spec.templates
  rng = np.random.default_rng(seed)
  wordings = list(tpl.train) + list(tpl.v1) + [tpl.v2]
  story_wordings = list(tpl.train_story) + [tpl.v3]
  out = []
  for occupation in spec.occupations:
    s = stereotype(spec, occupation, share)
    render = lambda t: templates_lib.render(t, occupation=occupation, region=spec.region, attribute=attr)
    for n, group, story in ((rows_per_occupation, wordings, False),
                            (stories_per_occupation, story_wordings, True)):
      cats = np.repeat(np.arange(attr.num_categories), build_lib.allocate(s, n))[rng.permutation(n)]
      for r, k in enumerate(cats.tolist()):
        response = (templates_lib.make_story(attr, k, occupation, rng) if story
                    else attr.categories[k].answer)
        out.append({"prompt": render(group[r % len(group)]), "occupation": occupation, "category": k,
                    "response": response, "target": [float(x) for x in s]})
  return out


# ------------------------------------------------------------------------------------------------
# Selecting a learning rate


MAX_NON_ANSWER = 0.2
# A model that still writes stories opens a story with a bare category word almost never (0-3% of
# the exact mass on held-out story prompts over the grids of three seeds); the rates that broke v3
# had 16-100% (one at 16% answered 93% of v3 with "FemaleMale" and the like). The mass counts every
# completion that starts with the category word, ended there or not: a bare answer followed by
# end of turn measured 0.3% for a model that answered 99% of v3 with "FemaleMale0Male1Female...".
MAX_STORY_BARE = 0.05
# With ``story_check_rounds``: the judged unparsed rate of sampled held-out stories (what v3
# scores) a selected rate may have: junk prose ("oinferment", digit strings) passes the bare-answer
# check but not this one.
MAX_STORY_UNPARSED = 0.2
# The paper's out-of-distribution test: models trained on one region, evaluated on another's.
OUT_OF_DISTRIBUTION = {"gender_real_uk": "gender_real_us"}
# The decoding configurations ours is also evaluated with (temperature, top_p).
DECODING_SWEEP = ((0.5, 1.0), (1.0, 1.0), (1.5, 1.0), (1.0, 0.9))


def _story_loss(lr: float, story_bare: dict[float, float],
                story_unparsed: dict[float, float]) -> float:
  """How far a rate's stories are from passing the story check (0 when they pass): the larger
  excess of the bare-answer mass and of the sampled stories' unparsed rate over their bounds."""
  return max(story_bare.get(lr, 0.0) - MAX_STORY_BARE,
             story_unparsed.get(lr, 0.0) - MAX_STORY_UNPARSED, 0.0)


def select(scores: dict[float, float], non_answer: dict[float, float],
           story_bare: dict[float, float] | None = None,
           story_unparsed: dict[float, float] | None = None) -> float:
  """The demo's one selection rule, for every trained method: the learning rate with the lowest
  held-out exact answer MAE (non-answer mass counted as error), among the rates whose non-answer
  mass is at most 20% and that keep their stories: with ``story_bare``, a bare-answer mass on
  held-out story prompts (the probability of opening a story with a bare category word) of at
  most 5%, and with ``story_unparsed``, at most 20% of sampled held-out stories unparsed by the v3
  judge (ties: the smaller rate). Where no rate passes both: among the rates within the
  non-answer bound, the one that loses its stories least; where none is within it, the lowest MAE."""
  story_bare, story_unparsed = story_bare or {}, story_unparsed or {}
  answers = [lr for lr in scores if non_answer[lr] <= MAX_NON_ANSWER]
  loss = lambda lr: _story_loss(lr, story_bare, story_unparsed)
  ok = [lr for lr in answers if loss(lr) == 0.0]
  if ok:
    return min(ok, key=lambda lr: (scores[lr], lr))
  if answers:
    return min(answers, key=lambda lr: (loss(lr), scores[lr], lr))
  return min(scores, key=lambda lr: (scores[lr], lr))


# ------------------------------------------------------------------------------------------------
# Runs


class Demo:
  """One dataset's miniature benchmark under ``run_dir/<dataset>``."""

  def __init__(self, dataset: str, run_dir: str, *, settings: DemoSettings, seed: int,
               tokenizer_dir: str, progress: bool = True, base_model: str | None = None,
               ablations: bool = True):
    from distfair_jax.data import build as build_lib
    from distfair_jax.tokenizer import load_tokenizer_dir
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
    # A given model (a ``distfair convert`` directory) instead of the biased base trained here.
    self.base_model = None if base_model is None else os.path.abspath(base_model)
    self.data = build_lib.build_dataset(
        spec, rows_per_occupation=settings.rows_per_occupation, test_rounds=settings.rounds,
        seed=seed, stories_per_occupation=settings.story_rows_per_occupation,
        pair_stories_per_occupation=settings.pair_story_rows_per_occupation)
    self.spec = self.data.spec
    self.attribute = self.spec.attribute
    self.timings: dict[str, float] = self._load_json("timings.json")
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
    from distfair_jax.train.preemption import Preempted
    start = time.perf_counter()
    earlier = f"{key} (before resuming)"
    try:
      out = fn()
    except Preempted:
      if key not in self.timings:
        self.timings[earlier] = round(self.timings.get(earlier, 0.0) +
                                      time.perf_counter() - start, 1)
        self._save_json("timings.json", self.timings)
      raise
    if key not in self.timings:
      self.timings[key] = round(time.perf_counter() - start + self.timings.pop(earlier, 0.0), 1)
      self._save_json("timings.json", self.timings)
    return out

  def sampler(self, model):
    """(a Sampler shared by every model of this architecture, the model's state)."""
    from flax import nnx
    from distfair_jax.sample import Sampler
    graphdef, state = nnx.split(model)
    if graphdef not in self._samplers:
      self._samplers[graphdef] = Sampler(graphdef)
    return self._samplers[graphdef], state

  # -- training -----------------------------------------------------------------------------------

  def config(self, run_dir: str, stages: list[str], *, lr: float = 1e-3, ablation: str = "full",
             sft_lr: float | None = None, sft_epochs: int | None = None,
             base_params: str | None = None, heldout_fraction: float | None = None,
             kl_pairs: str = "shifted") -> C.Config:
    s = self.s
    optim = lambda lr_, warm: C.OptimConfig(learning_rate=lr_, warmup_steps=warm, weight_decay=0.0)
    # Stage 2 and DPO on length-grouped batches when stories are trained: a packed pair row holds
    # four completions, so one story pair would pad a whole batch of one-word pairs to ~5x their
    # length. Stage 1 (and the base) keep the plain shuffle, every batch a mix of answers and
    # stories: with every stage grouped, base included, the selected SFT's held-out exact answer
    # MAE was 0.19 against 0.07 with the plain shuffle (gender_real_us, seed 0).
    grouped = s.story_rows_per_occupation > 0
    return C.Config(
        run_dir=run_dir, seed=self.seed, stages=stages,
        model=(C.ModelConfig(checkpoint=self.base_model) if self.base_model else
               C.ModelConfig(preset="tiny", tokenizer=self.tokenizer_dir, params=base_params)),
        lora=C.LoraConfig(enabled=s.lora_rank > 0, rank=max(s.lora_rank, 1), alpha=s.lora_alpha,
                          dropout=s.lora_dropout if s.lora_rank > 0 else 0.0,
                          targets=list(s.lora_targets)),
        data=C.DataConfig(dataset=self.dataset if self.spec_path is None else "gender_real_us",
                          spec=self.spec_path, rows_per_occupation=s.rows_per_occupation,
                          heldout_fraction=(s.heldout_fraction if heldout_fraction is None
                                            else heldout_fraction),
                          max_length=s.max_length, max_prompt_length=s.max_length - 16,
                          stories=s.story_rows_per_occupation > 0,
                          story_rows_per_occupation=s.story_rows_per_occupation or None,
                          # (recorded where pairs are trained: the SFT / IFT rows are the same)
                          pair_story_rows_per_occupation=(
                              s.pair_story_rows_per_occupation
                              if {"hybrid", "dpo"} & set(stages) else None),
                          length_buckets=C.LengthBuckets(s.length_buckets),
                          steering_placement=C.SteeringPlacement(s.steering_placement),
                          seed=self.seed),
        sft=C.SFTConfig(epochs=s.sft_epochs if sft_epochs is None else sft_epochs,
                        batch_size=s.sft_batch_size or s.batch_size,
                        group_by_length=grouped and s.sft_group_by_length,
                        optim=optim(lr if sft_lr is None else sft_lr, 10)),
        # The miniature keeps the reference online, as its README figures were measured (its
        # stage 2 is a few percent of its time); from a given model ``auto`` pools it.
        hybrid=C.HybridConfig(epochs=s.stage2_epochs, batch_size=s.batch_size, beta=s.beta,
                              ablation=ablation, kl_pairs=C.KLPairs(kl_pairs),
                              reference=(C.Reference.auto if self.base_model
                                         else C.Reference.online),
                              group_by_length=grouped, optim=optim(lr, 5)),
        dpo=C.DPOConfig(epochs=s.stage2_epochs, batch_size=s.batch_size // 2, beta=s.beta,
                        group_by_length=grouped, optim=optim(lr, 5)),
        checkpoint=C.CheckpointConfig(every_steps=0, keep=1, async_save=False),
        heldout=C.HeldoutConfig(every_steps=0, max_batches=0),
        logging=C.LoggingConfig(every_steps=10, tensorboard=False, progress=self.progress))

  def train_base(self) -> str:
    """The biased base model (stage ``ift`` on stereotyped records, from random weights); returns
    its run directory (a given ``base_model``: that directory, nothing trained)."""
    from distfair_jax.train.trainer import train
    if self.base_model:
      return self.base_model
    s = self.s
    records = stereotyped_records(self.spec, rows_per_occupation=s.base_rows_per_occupation,
                                  stories_per_occupation=s.base_stories_per_occupation,
                                  share=s.stereotype_share, seed=self.seed)
    run = os.path.join(self.dir, "base")
    cfg = self.config(run, ["ift"], lr=s.base_lr, sft_epochs=s.base_epochs, heldout_fraction=0.0)
    self._timed("base", lambda: train(cfg, records={"ift": records}))
    return run

  def _base_params(self) -> str | None:
    if self.base_model:
      return None  # the model config's checkpoint
    return os.path.join(self.dir, "base", "ift", "final", "params")

  def train_candidates(self, name: str, stages: list[str], lrs: Sequence[float], *,
                       ablation: str = "full", init_from: str | None = None, steered: bool,
                       kl_pairs: str = "shifted"):
    """Trains ``stages`` at each learning rate of the grid (the last stage varies; earlier ones are
    copied from ``init_from``); returns (best lr, its run directory, {lr: held-out exact MAE})."""
    from distfair_jax.train.trainer import train
    from distfair_jax.train.rundir import RunDir
    lrs = self._grid(name, lrs)
    sft_lr = None
    if init_from is not None:  # earlier stages were trained at the selected rate
      sft_lr = RunDir(init_from).read_config().sft.optim.learning_rate
    scores, non_answer, bare, unparsed, runs = {}, {}, {}, {}, {}
    for lr in lrs:
      run = os.path.join(self.dir, "runs", f"{name}_lr{lr:g}")
      if init_from is not None:
        for prev in stages[:-1]:
          if not os.path.exists(os.path.join(run, prev)):
            shutil.copytree(os.path.join(init_from, prev), os.path.join(run, prev))
      cfg = self.config(run, stages, lr=lr, ablation=ablation, sft_lr=sft_lr,
                        base_params=self._base_params(), kl_pairs=kl_pairs)
      self._timed(f"{name}@{lr:g}", lambda: train(cfg, records=self.data.records))
      scores[lr], non_answer[lr], bare[lr], unparsed[lr] = self.heldout_mae(run, steered=steered)
      runs[lr] = run
      console.log(f"[{self.dataset}] {name} lr={lr:g}: held-out exact answer MAE "
                  f"{scores[lr]:.4f} (non-answer {non_answer[lr]:.1%}"
                  + ("" if bare[lr] is None else f"; bare answers to story prompts "
                     f"{bare[lr]:.1%}")
                  + ("" if unparsed[lr] is None else f"; sampled stories unparsed "
                     f"{unparsed[lr]:.1%}") + ")")
    known = lambda d: {lr: v for lr, v in d.items() if v is not None}
    best = select(scores, non_answer, known(bare), known(unparsed))
    return best, runs[best], {lr: {"mae": scores[lr], "non_answer": non_answer[lr],
                                   "story_bare_answer": bare[lr],
                                   **({} if unparsed[lr] is None else
                                      {"story_unparsed": unparsed[lr]})} for lr in lrs}

  def _grid(self, name: str, lrs: Sequence[float]) -> tuple[float, ...]:
    """``lrs``, or the one rate ``tune_on``'s selection chose for ``name`` (another dataset of
    this run directory, trained first)."""
    tune_on = self.s.tune_on
    if tune_on is None or tune_on == self.dataset:
      return tuple(lrs)
    chosen = os.path.join(os.path.dirname(self.dir), tune_on, "selection.json")
    lr = fileio.read_json(chosen).get(name, {}).get("lr") if os.path.exists(chosen) else None
    if lr is None:
      console.log(f"[{self.dataset}] {name}: no rate selected on {tune_on} in this run "
                  f"directory: the grid {list(lrs)}")
      return tuple(lrs)
    console.log(f"[{self.dataset}] {name}: the rate selected on {tune_on}, {lr:g}")
    return (float(lr),)

  def heldout_mae(self, run: str, *, steered: bool
                  ) -> tuple[float, float, float | None, float | None]:
    """(exact answer MAE, non-answer mass, bare-answer mass on stories, unparsed rate of sampled
    stories) over the held-out *training* prompts. The first two on the attribute questions: the mean over prompts of
    mean_k |q_k - p_k|, p the prompt's target and q the model's exact probabilities of the K
    canonical answers (``evaluate.answer_probabilities``: summed over the steering tokens for a
    steered model), not renormalised, so mass on non-answers counts as error; and 1 - sum_k q_k.
    The third on the held-out story prompts (None without story rows): sum_k of the probability
    that the completion starts with answer k (``end_of_turn=False``), the mass on opening a story
    with a bare category word. The fourth (None without story rows or ``story_check_rounds``):
    ``story_check_rounds`` stories sampled per held-out story prompt with the evaluation's
    decoding (a steered model draws its own steering token first), judged as v3 is; the share in
    which the judge finds no category."""
    from distfair_jax import evaluate as eval_lib
    from distfair_jax.data.tokenize import Encoder
    from distfair_jax.train.heldout import split_heldout
    _, held = split_heldout(self.data.records["sft"], self.s.heldout_fraction, seed=self.seed)
    answers = set(self.attribute.answers)
    prompts, stories, occupation = {}, {}, {}
    for r in held:  # the attribute questions (a story row's response is no canonical answer)
      (prompts if r["response"] in answers else stories).setdefault(
          r["prompt"], np.asarray(r["target"], np.float64))
      occupation.setdefault(r["prompt"], r["occupation"])
    if not prompts:
      raise InputError(f"{self.dataset}: heldout_fraction: expected held-out prompts, got none")
    enc = Encoder(self.tokenizer, attribute=self.attribute if steered else None,
                  max_length=self.s.max_length, max_prompt_length=self.s.max_length - 16,
                  steering_placement=self.s.steering_placement)
    model = self.model(run)
    seqs = enc.encode_prompts(list(prompts))
    p = np.stack(list(prompts.values()))
    sampler, state = self.sampler(model)
    q = eval_lib.answer_probabilities(sampler, state, seqs, enc, self.attribute, steered=steered)
    bare = unparsed = None
    if stories:
      qs = eval_lib.answer_probabilities(sampler, state, enc.encode_prompts(list(stories)),
                                         enc, self.attribute, steered=steered, end_of_turn=False)
      bare = float(np.mean(qs.sum(-1)))
      if self.s.story_check_rounds > 0:
        unparsed = self._story_unparsed(sampler, state, enc, list(stories), occupation, steered)
    return float(np.mean(np.abs(q - p))), float(np.mean(1.0 - q.sum(-1))), bare, unparsed

  def _story_unparsed(self, sampler, state, enc, stories: Sequence[str], occupation: dict,
                      steered: bool) -> float:
    """The share of ``story_check_rounds`` sampled stories per held-out story prompt in which
    the v3 judge finds no category (the evaluation's decoding and judge; seed: the demo's)."""
    from distfair_jax import evaluate as eval_lib
    s = self.s
    slots = [{"prompt": prompt, "occupation": occupation[prompt]}
             for prompt in stories for _ in range(s.story_check_rounds)]
    cfg = C.EvalConfig(versions=["v3"], rounds=s.story_check_rounds,
                       steering="model" if steered else "none",
                       decode=C.DecodeConfig(temperature=1.0, top_p=1.0, top_k=0,
                                             max_new_tokens=s.answer_max_new_tokens,
                                             story_max_new_tokens=s.story_max_new_tokens),
                       seed=self.seed)
    rows = eval_lib.sample_version(sampler, state, enc, self.attribute, slots, version="v3",
                                   config=cfg, targets={})
    eval_lib.categorize(rows, self.attribute, story=True)
    return float(np.mean([r["category"] is None for r in rows]))

  def model(self, run: str):
    """The final model of a run (what ``distfair eval RUN`` evaluates), LoRA folded in; the
    given base model itself for ``run == base_model``."""
    from distfair_jax.model.loader import load_pretrained
    from distfair_jax.train.rundir import load_run
    if self.base_model and os.path.abspath(run) == self.base_model:
      return load_pretrained(run)[0]
    return load_run(run)[0].merged()

  # -- evaluation ---------------------------------------------------------------------------------

  def evaluate_method(self, method: str, run: str, *, name: str | None = None,
                      tests: dict | None = None, versions: Sequence[str] | None = None,
                      temperature: float = 1.0, top_p: float = 1.0) -> dict:
    """Evaluates ``run`` as ``method`` into ``<dataset>/<name or method>/eval`` (reused when
    there): the dataset's own test sets, or ``tests``; the one decoding configuration unless a
    sweep asks for another."""
    from distfair_jax import evaluate as eval_lib
    out_dir = os.path.join(self.dir, name or method)
    path = os.path.join(out_dir, "eval", "metrics.json")
    if os.path.exists(path):  # reused when it evaluated this run (a new selection re-evaluates)
      doc = fileio.read_json(path)  # the same run reached through another path (a symlink) too
      recorded = doc.get("meta", {}).get("run")
      if recorded and os.path.realpath(recorded) == os.path.realpath(run):
        return doc
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
    return self._timed(f"eval:{name or method}", lambda: eval_lib.evaluate(
        model, self.tokenizer, self.attribute, tests, out_dir, config=cfg, overwrite=True,
        metadata={"dataset": self.dataset, "method": method, "run": os.path.abspath(run),
                  **({"base_model": self.base_model} if self.base_model else {})},
        max_prompt_length=s.max_length - 16, steering_placement=s.steering_placement,
        sampler=sampler))

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
    console.log(f"[{self.dataset}] dpo: from IFT, lr grid {list(s.stage2_lrs)}")
    lr, run, scores = self.train_candidates("dpo", ["ift", "dpo"], s.stage2_lrs, init_from=ift_dir,
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
    """Models trained here, tested on another region's prompts with that region's targets (the
    paper's OOD test: trained on gender_real_uk, evaluated on gender_real_us); {} where the
    dataset has no such pair. -> {"<dataset>_on_<other>": {method: {version: summary}}}."""
    other = OUT_OF_DISTRIBUTION.get(self.dataset)
    if other is None:
      return {}
    from distfair_jax.data import build as build_lib
    data = build_lib.build_dataset(other, rows_per_occupation=1, test_rounds=self.s.rounds,
                                   seed=self.seed)
    tests = {v: data.records[f"test_{v}"] for v in self.s.versions}
    out = {}
    for method in self.methods:
      console.log(f"[{self.dataset}] evaluating {method} on {other} (out of distribution)")
      doc = self.evaluate_method(method, self.trained[method], name=f"{method}_on_{other}",
                                 tests=tests)
      out[method] = {v: _summary(m) for v, m in doc["versions"].items()}
    return {f"{self.dataset}_on_{other}": out}

  def kl_pairs_variant(self) -> dict[str, dict]:
    """How much ``hybrid.kl_pairs`` moves ours: stage 2 retrained with ``kl_pairs: reference``
    (the original's interleaved pairs) at ours' selected rate, from the same SFT, evaluated on v2
    beside ours (``shifted``): {"kl_pairs: shifted" | "kl_pairs: reference": v2 summary}."""
    lr = self.selection["ours"]["lr"]
    sft_dir = os.path.join(self.dir, "runs", f"sft_lr{self.selection['sft']['lr']:g}")
    console.log(f"[{self.dataset}] ours with hybrid.kl_pairs: reference, lr {lr:g}")
    _, run, _ = self.train_candidates("ours_klref", ["sft", "hybrid"], [lr], init_from=sft_dir,
                                      steered=True, kl_pairs="reference")
    out = {}
    for key, name, trained in (("kl_pairs: shifted", "ours", self.trained["ours"]),
                               ("kl_pairs: reference", "ours_kl_pairs_reference", run)):
      doc = self.evaluate_method("ours", trained, name=name, versions=["v2"])
      out[key] = {**_summary(doc["versions"]["v2"]), "z0_mean": _mean_z0(trained)}
    return out

  def decoding_sweep(self) -> dict[str, dict]:
    """Ours on v2 under other decoding configurations: {"T=..., top_p=...": summary}."""
    out = {}
    for t, p in DECODING_SWEEP:
      key = f"T={t:g}, top_p={p:g}"
      doc = self.evaluate_method("ours", self.trained["ours"], name=f"ours_T{t:g}_p{p:g}",
                                 versions=["v2"], temperature=t, top_p=p)
      out[key] = _summary(doc["versions"]["v2"])
    return out


def _mean_z0(run: str) -> float | None:
  """The mean over logged training steps of KTO's reference point z0 (the ``kl`` metric) in a
  run's hybrid stage: where it is 0 throughout (clamped: max(0, mismatched reward)), the
  mismatched pairs, hence ``kl_pairs``, cannot change the training."""
  path = os.path.join(run, "metrics.jsonl")
  if not os.path.exists(path):
    return None
  z0 = [row["kl"] for _, row in fileio.read_jsonl(path)
        if row.get("stage") == "hybrid" and row.get("split", "train") == "train" and "kl" in row]
  return float(np.mean(z0)) if z0 else None


# ------------------------------------------------------------------------------------------------
# Tables and plots


def _summary(m: dict) -> dict:
  out = {"mae": m["mae"], "mae_ci": m.get("mae_ci"), "mae_corrected": m.get("mae_corrected"),
         "unparsed_rate": m.get("unparsed_rate"), "exact_answer_mae": m.get("exact_answer_mae"),
         "non_answer": m.get("non_answer"),
         "kl": m.get("kl"), "kl_sum": m.get("kl_sum"), "kl_std": m.get("kl_std"),
         "exact_mae": m.get("exact_mae")}
  if "mae_floor" in m:
    out["mae_floor"] = m["mae_floor"]
  return out


def results_table(results: dict, versions: Sequence[str]) -> str:
  """Markdown: one row per (dataset, method), per version the MAE and, in brackets, the
  bias-corrected estimate with its 95% interval (metrics' docstring); exact MAE, unparsed rate."""
  exact = [v for v in versions if v != "v3"]  # stories have no canonical answers
  head = (["dataset", "method"] + [f"{v} MAE (corrected [95% CI])" for v in versions]
          + [f"{v} exact answer MAE" for v in exact] + ["v2 non-answer", "v2 exact steering MAE"]
          + [f"{v} unparsed" for v in versions])
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for ds, methods in results.items():
    for method in METHODS:
      if method not in methods:
        continue
      cells = [ds, method]
      for v in versions:
        m = methods[method].get(v)
        if m is None:
          cells.append("")
          continue
        ci = m.get("mae_ci")
        corrected = m.get("mae_corrected")
        cells.append(f"{m['mae']:.3f}" + (f" ({corrected:.3f} [{ci[0]:.3f}, {ci[1]:.3f}])"
                                          if ci and corrected is not None else ""))
      for v in exact:
        e = (methods[method].get(v) or {}).get("exact_answer_mae")
        cells.append("" if e is None else f"{e:.3f}")
      v2 = methods[method].get("v2") or {}
      cells.append("" if v2.get("non_answer") is None else f"{v2['non_answer']:.1%}")
      cells.append("" if v2.get("exact_mae") is None else f"{v2['exact_mae']:.3f}")
      for v in versions:
        rate = (methods[method].get(v) or {}).get("unparsed_rate")
        cells.append("" if rate is None else f"{rate:.1%}")
      lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def sweep_table(sweeps: dict[str, dict], label: str = "decoding") -> str:
  """Markdown: ours on v2 under each decoding configuration of ``DECODING_SWEEP`` (or each
  variant of ``Demo.kl_pairs_variant``, ``label`` naming the column)."""
  def cell(m: dict, f: str, pct: bool = False) -> str:
    if m.get(f) is None:
      return ""
    text = f"{100 * m[f]:.1f}%" if pct else f"{m[f]:.3f}"
    if f"{f}_sd" in m:  # several seeds: mean ± sd
      text += f" ± {100 * m[f + '_sd']:.1f}" if pct else f" ± {m[f + '_sd']:.3f}"
    return text

  z0 = any("z0_mean" in m for rows in sweeps.values() for m in rows.values())
  lines = [f"| dataset | {label} | v2 MAE | exact answer MAE | non-answer | unparsed |"
           + (" mean z0 in training |" if z0 else ""), "|---|---|---|---|---|---|" + "---|" * z0]
  for ds, rows in sweeps.items():
    for key, m in rows.items():
      lines.append(f"| {ds} | {key} | {cell(m, 'mae')} | {cell(m, 'exact_answer_mae')} | "
                   f"{cell(m, 'non_answer', True)} | {cell(m, 'unparsed_rate', True)} |"
                   + (f" {cell(m, 'z0_mean')} |" if z0 else ""))
  return "\n".join(lines) + "\n"


def kl_table(results: dict, versions: Sequence[str]) -> str:
  """Markdown: the paper's KL table, KL(target || achieved) in nats per version, the sum and mean
  over occupations (with their std over occupations for one seed; mean ± sd over seeds for
  several)."""
  def cell(m: dict | None) -> str:
    if not m or m.get("kl") is None:
      return ""
    if "kl_sd" in m:
      return f"{m['kl_sum']:.2f} ± {m['kl_sum_sd']:.2f} / {m['kl']:.3f} ± {m['kl_sd']:.3f}"
    return f"{m['kl_sum']:.2f} / {m['kl']:.3f} ({m['kl_std']:.3f})"

  several = any("kl_sd" in (v or {}) for ms in results.values() for m in ms.values()
                for v in m.values())
  how = "sum / mean, each mean ± sd over seeds" if several else "sum / mean (std over occupations)"
  head = ["dataset", "method"] + [f"{v} KL {how}" for v in versions]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for ds, methods in results.items():
    for method in METHODS:
      if method in methods:
        lines.append("| " + " | ".join([ds, method] + [cell(methods[method].get(v))
                                                       for v in versions]) + " |")
  return "\n".join(lines) + "\n"


def comparison_plot(results: dict, versions: Sequence[str], path: str) -> None:
  """Bar chart of MAE per method and version, one panel per dataset: with several seeds the mean
  with ± one standard deviation over seeds; with one seed the MAE, and the bias-corrected
  estimate with its 95% interval as a point with error bars."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  datasets = list(results)
  fig = Figure(figsize=(max(7.0, 1.2 * len(METHODS) * len(versions) / 2), 3.2 * len(datasets)))
  FigureCanvasAgg(fig)
  for i, ds in enumerate(datasets):
    ax = fig.add_subplot(len(datasets), 1, i + 1)
    width = 0.8 / len(versions)
    for j, v in enumerate(versions):
      xs, ys, centres, lo, hi = [], [], [], [], []
      for m_i, method in enumerate(METHODS):
        m = results[ds].get(method, {}).get(v)
        if m is None:
          continue
        xs.append(m_i + (j - (len(versions) - 1) / 2) * width)
        ys.append(m["mae"])
        if "mae_sd" in m:
          centre, low, high = m["mae"], m["mae"] - m["mae_sd"], m["mae"] + m["mae_sd"]
        elif m.get("mae_ci") and m.get("mae_corrected") is not None:
          centre, (low, high) = m["mae_corrected"], m["mae_ci"]
        else:
          centre = low = high = m["mae"]
        centres.append(centre)
        lo.append(max(0.0, centre - low))
        hi.append(max(0.0, high - centre))
      bars = ax.bar(xs, ys, width, label=v)
      ax.errorbar(xs, centres, yerr=[lo, hi], fmt="o", markersize=2, capsize=2,
                  color=bars.patches[0].get_facecolor() if bars.patches else "k", ecolor="k")
    ax.set_xticks(range(len(METHODS)), METHODS, rotation=20, fontsize=8)
    ax.set_ylabel("MAE")
    ax.set_title(f"{ds}: mean absolute error to the target distribution (lower is better)", fontsize=9)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def occupation_plot(dataset_dir: str, methods: Sequence[str], version: str, path: str) -> bool:
  """Per occupation, each method's exact answer distribution on ``version`` (the canonical
  answers' probabilities renormalised; else its exact steering distribution; else its sampled
  shares) against the target: one panel per category (one in all for two), occupations by their
  target share of the first category. Reads
  ``dataset_dir/<method>/eval/metrics.json``; False (nothing written) when none has ``version``."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  rows = {}
  for method in methods:
    doc = os.path.join(dataset_dir, method, "eval", "metrics.json")
    v = fileio.read_json(doc).get("versions", {}).get(version) if os.path.exists(doc) else None
    if v is not None:
      rows[method] = {o["occupation"]: o for o in v["per_occupation"]}
  if not rows:
    return False
  first = next(iter(rows.values()))
  order = sorted(first, key=lambda o: -first[o]["target"][0])
  categories = next(iter(fileio.read_json(os.path.join(dataset_dir, m, "eval", "metrics.json"))
                         ["versions"][version].get("categories") or [] for m in rows))
  k = len(first[order[0]]["target"])
  panels = 1 if k == 2 else k
  fig = Figure(figsize=(max(7.0, 0.45 * len(order)), 1.0 + 2.6 * panels))
  FigureCanvasAgg(fig)
  x = np.arange(len(order))
  for c in range(panels):
    ax = fig.add_subplot(panels, 1, c + 1)
    ax.plot(x, [first[o]["target"][c] for o in order], "k_", markersize=14, mew=2, label="target")
    for method, occ in rows.items():
      shares = []
      for o in order:
        entry = occ[o]
        probs = np.asarray(entry.get("answer_probs") or entry.get("exact") or entry["achieved"],
                           np.float64)
        shares.append(probs[c] / probs.sum() if probs.sum() > 0 else np.nan)
      ax.plot(x, shares, "o-" if method == "ours" else ".--", markersize=5 if method == "ours"
              else 4, linewidth=1.5 if method == "ours" else 0.8, label=method)
    name = categories[c] if c < len(categories) else str(c)
    ax.set_ylabel(f"P({name})")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xticks(x, [o[:28] for o in order] if c == panels - 1 else [], rotation=60, ha="right",
                  fontsize=7)
    if c == 0:
      ax.set_title(f"{os.path.basename(dataset_dir)}, {version}: each method's exact answer "
                   f"distribution per occupation against the target", fontsize=9)
      ax.legend(fontsize=7, ncol=4)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return True


def _tokenizer(run_dir: str, dataset: str) -> str:
  """The tiny tokenizer's directory for ``dataset``: one for the built-in datasets (trained on their
  texts), and for a spec of your own one of its own, trained on the built-in texts plus its
  prompts and answers (``tokenizer.dataset_texts``), so that its words merge as the built-in
  ones do."""
  from distfair_jax.data.build import DATASETS, resolve_spec
  from distfair_jax.tokenizer import build_tiny_tokenizer, dataset_texts
  texts = None
  path = os.path.join(run_dir, "tokenizer")
  if dataset not in DATASETS:
    spec = resolve_spec(dataset)
    path = os.path.join(run_dir, spec.name, "tokenizer")
    texts = dataset_texts(spec)
  if not os.path.exists(os.path.join(path, "tokenizer.json")):
    build_tiny_tokenizer(path, texts=texts, overwrite=True)
  return path


def _any_stage_started(run_dir: str) -> bool:
  """Whether any training run under ``run_dir`` has a checkpoint or a finished stage (a demo whose
  first attempt failed before training holds nothing another setting would contradict)."""
  for root, dirs, files in os.walk(run_dir):
    name = os.path.basename(root)
    if (name == "final" and "summary.json" in files) or (name == "checkpoints" and
                                                           (dirs or files)):
      return True
  return False


def run_demo(datasets: Sequence[str], run_dir: str, *, quick: bool = False, seed: int = 0,
             seeds: Sequence[int] | None = None, fresh: bool = False,
             progress: bool = True, model: str | None = None,
             settings: DemoSettings | None = None,
             ablations: Sequence[str] | None = None) -> dict:
  """Runs the miniature benchmark; writes results.json, results.md, comparison.png; returns results.

  datasets: built-in names (``data.build.DATASETS``) or YAML spec files of your own attribute
  (``data.build.load_spec``), each checked before anything runs. ``seeds``: several seeds, each a
  whole demo under ``run_dir/seed<N>`` (kept, and reused on a rerun), and ``run_dir``'s results
  their mean and standard deviation (``aggregate_seeds``); default: the one ``seed`` in ``run_dir``.
  ``model``: a converted model directory (``distfair convert gguf-to-flax`` / ``hf-to-flax``) to
  start every method from instead of the biased base trained here, with ``REAL``'s sizes and its
  own tokenizer and chat template; ``settings`` overrides the sizes (``DEFAULT``, ``QUICK``,
  ``REAL``). ``ablations``: the datasets (names) whose runs include the ablations kl_only and
  kto_only (default: every one).
  """
  from distfair_jax.data.build import DATASETS, resolve_spec
  for ds in datasets:
    if ds not in DATASETS and not str(ds).endswith((".yaml", ".yml")):
      raise InputError(f"demo: dataset: expected one of {', '.join(DATASETS)} or a YAML spec file, "
                       f"got {ds!r}")
    resolve_spec(ds)  # a bad spec fails here, in one line, before any training
  names = [resolve_spec(ds).name for ds in datasets]
  unknown = sorted(set(ablations or ()) - set(names))
  if unknown:
    raise InputError(f"demo: ablations: expected some of the datasets run ({', '.join(names)}), "
                     f"got {', '.join(unknown)}")
  seeds = [int(seed)] if seeds is None else [int(x) for x in seeds]
  if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
    raise InputError(f"demo: seeds: expected distinct non-negative integers, got {seeds}")
  if model is not None:
    _check_model_dir(model)
  if settings is None:
    settings = settings_for(quick=quick, model=model)
  run_dir = os.path.abspath(run_dir)
  if fresh and os.path.exists(run_dir):
    shutil.rmtree(run_dir)
  os.makedirs(run_dir, exist_ok=True)
  if len(seeds) == 1:
    return _run_seed(datasets, run_dir, settings=settings, quick=quick, seed=seeds[0],
                     progress=progress, model=model, ablations=ablations)
  _check_marker(run_dir, {"quick": quick, "seeds": seeds, "settings": dataclasses.asdict(settings),
                          **_model_info(model)})
  start = time.perf_counter()
  per_seed = {s: _run_seed(datasets, os.path.join(run_dir, f"seed{s}"), settings=settings,
                           quick=quick, seed=s, progress=progress, model=model,
                           ablations=ablations) for s in seeds}
  results = aggregate_seeds(per_seed)
  fileio.write_json(os.path.join(run_dir, "results.json"), results, indent=1)
  sweeps = _aggregate_v2(run_dir, seeds, "decoding_sweep.json")
  pairs = _aggregate_v2(run_dir, seeds, "kl_pairs.json")
  fileio.write_json(os.path.join(run_dir, "timings.json"),
                    {"seeds": {str(s): fileio.read_json(os.path.join(run_dir, f"seed{s}",
                                                                     "timings.json"))
                               for s in seeds},
                     "total_s": round(time.perf_counter() - start, 1)}, indent=1)
  fileio.write_text(os.path.join(run_dir, "results.md"),
                    f"# distfair demo ({'quick' if quick else 'default'}, seeds "
                    f"{', '.join(map(str, seeds))})\n\n{seeds_table(results, settings.versions)}"
                    f"\n## KL(target || achieved)\n\n{kl_table(results, settings.versions)}"
                    f"\n## Decoding sensitivity (ours, v2)\n\n{sweep_table(sweeps)}"
                    f"\n## KTO's mismatched pairs (ours, v2)\n\n{sweep_table(pairs, 'hybrid')}")
  comparison_plot(results, settings.versions, os.path.join(run_dir, "comparison.png"))
  return results


def _aggregate_v2(run_dir: str, seeds: Sequence[int], name: str) -> dict:
  """A per-seed {dataset: {variant: v2 summary}} file (``decoding_sweep.json``,
  ``kl_pairs.json``) averaged over the seeds (``aggregate_seeds``), written under ``run_dir``."""
  wrapped = {s: {ds: {key: {"v2": m} for key, m in rows.items()} for ds, rows in
                 fileio.read_json(os.path.join(run_dir, f"seed{s}", name)).items()}
             for s in seeds}
  out = {ds: {key: m["v2"] for key, m in rows.items()}
         for ds, rows in aggregate_seeds(wrapped).items()}
  fileio.write_json(os.path.join(run_dir, name), out, indent=1)
  return out


def _check_marker(run_dir: str, info: dict) -> None:
  marker = os.path.join(run_dir, "demo.json")
  if (os.path.exists(marker) and fileio.read_json(marker) != json.loads(json.dumps(info)) and
      _any_stage_started(run_dir)):
    raise InputError(f"{marker}: this run directory holds a demo with other settings (quick / "
                     f"seeds); use another --run-dir or --fresh")
  fileio.write_json(marker, info, indent=1)


def _check_model_dir(model: str) -> None:
  """A one-line error, before anything runs, for a ``--model`` that is no converted directory."""
  from distfair_jax import convert
  path = fileio.as_path(model)
  if not path.is_dir():
    raise InputError(f"{model}: demo --model: expected a directory from `distfair convert "
                     f"hf-to-flax` or `gguf-to-flax`, got {'a file' if path.exists() else 'none'}")
  convert.load_model_config(path)  # names the file and field when it is not one


def _model_info(model: str | None) -> dict:
  return {} if model is None else {"model": os.path.abspath(model)}


def _run_seed(datasets: Sequence[str], run_dir: str, *, settings: DemoSettings, quick: bool,
              seed: int, progress: bool, model: str | None = None,
              ablations: Sequence[str] | None = None) -> dict:
  """One seed's whole demo under ``run_dir`` (reused where finished); returns its results."""
  os.makedirs(run_dir, exist_ok=True)
  _check_marker(run_dir, {"quick": quick, "seed": seed, "settings": dataclasses.asdict(settings),
                          **_model_info(model)})
  from distfair_jax.data.build import resolve_spec
  results, timings, sweeps, pairs = {}, {}, {}, {}
  start = time.perf_counter()
  # The dataset the others take their learning rates from (``tune_on``) first; tables keep the
  # order asked for.
  names = [resolve_spec(ds).name for ds in datasets]
  for ds in sorted(datasets, key=lambda d: resolve_spec(d).name != settings.tune_on):
    demo = Demo(ds, run_dir, settings=settings, seed=seed,
                tokenizer_dir=model if model is not None else _tokenizer(run_dir, ds),
                progress=progress, base_model=model,
                ablations=ablations is None or resolve_spec(ds).name in set(ablations))
    results[demo.dataset] = demo.run()
    if settings.analyses:
      results.update(demo.out_of_distribution())
      sweeps[demo.dataset] = demo.decoding_sweep()
      pairs[demo.dataset] = demo.kl_pairs_variant()
    timings[demo.dataset] = demo.timings
  results = {n: results[n] for n in names if n in results} | results
  total = time.perf_counter() - start
  fileio.write_json(os.path.join(run_dir, "results.json"), results, indent=1)
  fileio.write_json(os.path.join(run_dir, "decoding_sweep.json"), sweeps, indent=1)
  fileio.write_json(os.path.join(run_dir, "kl_pairs.json"), pairs, indent=1)
  fileio.write_json(os.path.join(run_dir, "timings.json"),
                    {"datasets": timings, "total_s": round(total, 1)}, indent=1)
  table = results_table(results, settings.versions)
  fileio.write_text(os.path.join(run_dir, "results.md"),
                    f"# distfair demo ({'quick' if quick else 'default'}, seed {seed})\n\n{table}"
                    f"\n## KL(target || achieved)\n\n{kl_table(results, settings.versions)}"
                    f"\n## Decoding sensitivity (ours, v2)\n\n{sweep_table(sweeps)}"
                    f"\n## KTO's mismatched pairs (ours, v2)\n\n{sweep_table(pairs, 'hybrid')}")
  comparison_plot(results, settings.versions, os.path.join(run_dir, "comparison.png"))
  return results


SEED_FIELDS = ("mae", "mae_corrected", "exact_answer_mae", "non_answer", "exact_mae",
               "unparsed_rate", "kl", "kl_sum", "z0_mean")


def aggregate_seeds(per_seed: dict[int, dict]) -> dict:
  """{seed: results} -> results of the same shape whose figures are the means over the seeds,
  with ``<field>_sd`` (the sample standard deviation over seeds), ``seeds`` and ``per_seed``
  (the seeds' own figures); a figure missing in any seed is left out."""
  seeds = sorted(per_seed)
  first = per_seed[seeds[0]]
  out: dict = {}
  for ds, methods in first.items():
    out[ds] = {}
    for method, versions in methods.items():
      out[ds][method] = {}
      for v in versions:
        runs = [per_seed[s][ds][method][v] for s in seeds]
        entry: dict[str, Any] = {"seeds": seeds, "per_seed": runs}
        for f in SEED_FIELDS:
          vals = [r.get(f) for r in runs]
          if all(isinstance(x, (int, float)) for x in vals):
            entry[f] = float(np.mean(vals))
            entry[f"{f}_sd"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
        out[ds][method][v] = entry
  return out


def seeds_table(results: dict, versions: Sequence[str]) -> str:
  """Markdown of ``aggregate_seeds`` results: mean ± sd over the seeds, per version the sampled
  MAE, then v2's exact answer MAE, non-answer mass and exact steering MAE, and each version's
  unparsed rate."""
  def cell(m: dict | None, f: str, pct: bool = False) -> str:
    if not m or f not in m:
      return ""
    mean, sd = m[f], m[f"{f}_sd"]
    return f"{100 * mean:.1f}% ± {100 * sd:.1f}" if pct else f"{mean:.3f} ± {sd:.3f}"

  n = len(next(iter(next(iter(next(iter(results.values())).values())).values()))["seeds"])
  exact = [v for v in versions if v != "v3"]
  head = (["dataset", "method"] + [f"{v} MAE" for v in versions]
          + [f"{v} exact answer MAE" for v in exact] + ["v2 non-answer", "v2 exact steering MAE"]
          + [f"{v} unparsed" for v in versions])
  lines = [f"Mean ± standard deviation over {n} seeds.", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for ds, methods in results.items():
    for method in METHODS:
      if method not in methods:
        continue
      m = methods[method]
      cells = ([ds, method] + [cell(m.get(v), "mae") for v in versions]
               + [cell(m.get(v), "exact_answer_mae") for v in exact]
               + [cell(m.get("v2"), "non_answer", True), cell(m.get("v2"), "exact_mae")]
               + [cell(m.get(v), "unparsed_rate", True) for v in versions])
      lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"
