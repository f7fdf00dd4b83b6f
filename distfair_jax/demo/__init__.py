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

The package, in the order a run goes: ``settings`` (the sizes), ``base_data`` (the biased base's
records), ``configs`` (each training run's Config), ``selection`` (the learning-rate rule and the
held-out scores it reads), ``dataset`` (``Demo``: one dataset's methods trained, selected and
evaluated), ``analyses`` (the paper's further analyses), ``tables`` (Markdown and the plot),
``seeds`` (several seeds as one) and ``runner`` (``run_demo``: datasets and seeds, and the one
function that writes results).
"""

from distfair_jax.demo.analyses import DECODING_SWEEP, OUT_OF_DISTRIBUTION
from distfair_jax.demo.base_data import stereotype, stereotyped_records
from distfair_jax.demo.dataset import Demo
from distfair_jax.demo.runner import run_demo, write_results
from distfair_jax.demo.seeds import SEED_FIELDS, aggregate_seeds
from distfair_jax.demo.selection import (MAX_NON_ANSWER, MAX_STORY_BARE, MAX_STORY_FAILED,
                                         passes, select)
from distfair_jax.demo.settings import (ABLATION, ABLATIONS, DEFAULT, METHODS, QUICK, REAL,
                                        RATE_NAMES, REFERENCE_OCCUPATIONS, STEERED, DemoSettings,
                                        parse_rates, scaled, settings_for)
from distfair_jax.demo.tables import (comparison_plot, headline_table, kl_table,
                                      occupation_plot, results_table, seeds_table, sweep_table)

__all__ = ["DECODING_SWEEP", "OUT_OF_DISTRIBUTION", "stereotype", "stereotyped_records", "Demo",
           "run_demo", "write_results", "SEED_FIELDS", "aggregate_seeds", "MAX_NON_ANSWER",
           "MAX_STORY_BARE", "MAX_STORY_FAILED", "passes", "select", "ABLATION", "ABLATIONS",
           "DEFAULT", "METHODS", "QUICK", "REAL", "RATE_NAMES", "REFERENCE_OCCUPATIONS", "STEERED",
           "DemoSettings", "parse_rates", "scaled", "settings_for", "comparison_plot",
           "headline_table", "kl_table", "occupation_plot", "results_table", "seeds_table",
           "sweep_table"]
