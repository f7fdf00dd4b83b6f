"""The demo's sizes: ``DemoSettings`` and its presets (``DEFAULT``, ``QUICK``, ``REAL``),
scaled to a dataset's table (``scaled``) and chosen for a command line (``settings_for``)."""

from __future__ import annotations

import dataclasses
from typing import Sequence

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
  # DPO's own grid where it needs other rates than stage 2's (None: ``stage2_lrs``).
  dpo_lrs: tuple[float, ...] | None = None
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
  # Several seeds (``--seeds``): the seeds after the first train each method at the rate the first
  # seed selected for the dataset (a one-point grid), as a study fixes its hyper-parameters once
  # and varies the seed; False: every seed selects from the grids.
  tune_first_seed: bool = False
  # Rates fixed beforehand (``--rates``), {name: lr} as pairs: each named method trains at its one
  # rate instead of its grid (names: sft, ift, dpo and the steered methods), ahead of ``tune_on``
  # and the first seed's selection; the held-out scores are still written to selection.json. A
  # rate carried over so (or by ``tune_on``) that fails the selection's held-out checks on the
  # dataset brings back the rest of the grid (``Demo.train_candidates``).
  rates: tuple[tuple[str, float], ...] = ()
  # The paper's further analyses (out of distribution, the decoding sweep, kl_pairs: reference).
  analyses: bool = True
  # Stage 2's weight of the desirable completions' NLL (``hybrid.nll_weight``; 0: the paper's
  # objective). Its runs are named ``<method>_lr<rate>_nll<weight>``, beside the paper's.
  nll_weight: float = 0.0
  # How the layers run (``model.scan_layers``, ``model.remat``): the same weights either way.
  scan_layers: bool = False
  remat: str = "none"


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
# (the paper: 3), two-point grids (stage 2: 1e-4 and 5e-4, the rate at which all-linear adapters
# calibrated SmolLM2 in 126 stage-2 steps; DPO 1e-5 too: at 1e-4 and 5e-4 DPO left 39% and 49% of
# the held-out answer mass on non-answers on gender_real_us), stories of at most 64 new tokens, the
# selection's story check sampling 4 stories per held-out story prompt, and no further
# analyses, every stage on length-grouped batches (half the rows are stories). Batches as the
# paper's: SFT 4 rows, stage 2 8 rows (4 pairs), DPO 4 pairs; with 16-row SFT batches the 35 steps
# at 1e-4 left SmolLM2's steered answers 99.4% non-answer on the held-out prompts. Batches pad
# to 1.5x steps too (``fine``): with length grouping, the SFT step fell from 7.3 s to ~4.4 s.
# The grids run on gender_real_us; the other datasets reuse its selected rates (``tune_on``), and
# with several seeds, the later seeds the first seed's (``tune_first_seed``): a dataset or a seed
# in about half the time. The layers scanned and rematerialised: SmolLM2's stage-2 step on a batch
# of 4 story pairs (packed rows of 512 tokens) needed 9.6 GB of temporaries with the 30 layers
# unrolled (two demos side by side outgrew 24 GB), 6.4 GB scanned, 0.6 GB scanned with remat full,
# which also ran it in 39-43 s against 48-61 s unrolled, and compiled each batch shape in ~8 s
# against 50-90 s.
REAL = DemoSettings(rows_per_occupation=16, story_rows_per_occupation=16, sft_epochs=2,
                    stage2_epochs=2, batch_size=8, sft_batch_size=4, sft_lrs=(1e-4, 1e-3),
                    stage2_lrs=(1e-4, 5e-4), dpo_lrs=(1e-5, 1e-4, 5e-4),
                    rounds=100, max_length=256, story_max_new_tokens=64, answer_max_new_tokens=16,
                    lora_rank=32, lora_alpha=16.0, lora_dropout=0.05, lora_targets=("all-linear",),
                    sft_group_by_length=True, story_check_rounds=4, analyses=False,
                    pair_story_rows_per_occupation=4, length_buckets="fine",
                    tune_on="gender_real_us", tune_first_seed=True, scan_layers=True,
                    remat="full")


# The names ``rates`` may fix: stage 1 of the steered methods (sft), IFT, DPO, each stage 2.
RATE_NAMES = ("sft", "ift", "dpo", *STEERED)


def parse_rates(text: str) -> tuple[tuple[str, float], ...]:
  """``sft=1e-3,ift=1e-3,ours=5e-4,dpo=1e-5`` as ``DemoSettings.rates``; a one-line error for a
  name not in ``RATE_NAMES``, a repeated name or a rate that is not a positive number."""
  rates: dict[str, float] = {}
  for item in (x.strip() for x in str(text).split(",")):
    if not item:
      continue
    name, sep, value = (x.strip() for x in item.partition("="))
    if not sep or name not in RATE_NAMES or name in rates:
      raise InputError(f"demo: --rates: {item!r}: expected NAME=RATE once per name, NAME one of "
                       f"{', '.join(RATE_NAMES)}")
    try:
      lr = float(value)
    except ValueError:
      lr = float("nan")
    if not lr > 0 or lr == float("inf"):
      raise InputError(f"demo: --rates: {item!r}: expected a positive learning rate for {name}, "
                       f"got {value!r}")
    rates[name] = lr
  if not rates:
    raise InputError(f"demo: --rates: expected NAME=RATE pairs such as sft=1e-3,ours=5e-4, got "
                     f"{text!r}")
  return tuple(rates.items())


def settings_for(*, quick: bool, model: str | None, lora_targets: Sequence[str] | None = None,
                 steering_placement: str | None = None,
                 rates: Sequence[tuple[str, float]] = (),
                 nll_weight: float | None = None) -> DemoSettings:
  """The sizes ``distfair demo`` runs with: ``DEFAULT`` / ``QUICK`` on the tiny model, ``REAL``
  from a given model, ``QUICK`` with ``REAL``'s fine-tuning and lengths for ``--quick --model``;
  ``lora_targets`` replaces the adapters' targets (a given model only); ``steering_placement``
  the steering token's place; ``rates`` the rates fixed beforehand (``parse_rates``);
  ``nll_weight`` stage 2's NLL term."""
  if nll_weight is not None and not 0 <= nll_weight < float("inf"):
    raise InputError(f"demo: --nll-weight: expected a finite number >= 0, got {nll_weight}")
  placed = lambda s: dataclasses.replace(
      s, rates=tuple(rates), **({} if steering_placement is None else
                               {"steering_placement": steering_placement}),
      **({} if nll_weight is None else {"nll_weight": float(nll_weight)}))
  if model is None:
    if lora_targets:
      raise InputError("demo: --lora-targets: expected --model (the built-in tiny model is "
                       "fine-tuned in full)")
    return placed(QUICK if quick else DEFAULT)
  settings = REAL if not quick else dataclasses.replace(
      QUICK, lora_rank=REAL.lora_rank, lora_alpha=REAL.lora_alpha,
      lora_dropout=REAL.lora_dropout, lora_targets=REAL.lora_targets,
      max_length=REAL.max_length, answer_max_new_tokens=REAL.answer_max_new_tokens,
      length_buckets=REAL.length_buckets, analyses=False, scan_layers=REAL.scan_layers,
      remat=REAL.remat)
  if lora_targets:
    settings = dataclasses.replace(settings, lora_targets=tuple(lora_targets))
  return placed(settings)
