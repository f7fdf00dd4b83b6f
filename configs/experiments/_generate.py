"""Writes configs/experiments/<dataset>/<model>.yaml and <model>-baseline.yaml from the paper's table.

    python configs/experiments/_generate.py          # rewrite the files
    python configs/experiments/_generate.py --check  # exit 1 if a committed file differs

RECIPES transcribes METHOD.md's "SFT epochs / lr ; hybrid batch / epochs / lr" table; cells the paper
does not give use the Qwen2.5-7B recipe. The shared settings live in _recipes/*.yaml. The baselines'
warmup (the original's warmup ratio 0.05) is turned into steps from the dataset's size: ceil(0.05 x the
stage's optimizer steps), with the record counts of ``distfair_jax.data`` at the recipe's settings
(100 rows per occupation, 10% held out). tests/test_experiment_configs.py checks the files are current.
"""

from __future__ import annotations

import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

DATASETS = ("gender_real_uk", "gender_real_us", "gender_even_uk", "gender_even_us", "race_even_us",
            "sentiment_even_us")
# model -> (METHOD.md's name, LoRA recipe file)
MODELS = {
    "llama3.2-1b": ("Llama-3.2-1B", "lora_1-2b.yaml"),
    "llama3.1-8b": ("Llama-3.1-8B", "lora_7-9b.yaml"),
    "qwen2.5-1.5b": ("Qwen2.5-1.5B", "lora_1-2b.yaml"),
    "qwen2.5-7b": ("Qwen2.5-7B", "lora_7-9b.yaml"),
    "gemma2-2b": ("Gemma-2-2B", "lora_1-2b.yaml"),
    "gemma2-9b": ("Gemma-2-9B", "lora_7-9b.yaml"),
}
# The Hugging Face directory each model's instruct checkpoint is published as (default: NAME-Instruct).
HF_NAMES = {"gemma2-2b": "gemma-2-2b-it", "gemma2-9b": "gemma-2-9b-it"}
# Llama 3.x's chat template writes today's date into every prompt: pinned (to the template's own
# fallback date), so that training and every later evaluation see the same prompt.
PINNED_DATE = "26 Jul 2024"
DATE_PINNED = ("llama3.2-1b", "llama3.1-8b")
# (sft_epochs, sft_lr, hybrid_batch, hybrid_epochs, hybrid_lr); None: not given in the paper
_Q7 = {"gender_real_uk": (2, 1e-5, 8, 3, 1e-6), "gender_real_us": (2, 1e-5, 8, 3, 1e-6),
       "gender_even_uk": (2, 1e-5, 8, 3, 1e-6), "gender_even_us": (2, 1e-5, 16, 3, 1e-6),
       "race_even_us": (2, 1e-5, 8, 3, 1e-6), "sentiment_even_us": (2, 1e-5, 16, 3, 1e-6)}
RECIPES = {
    "qwen2.5-7b": _Q7,
    "qwen2.5-1.5b": {"gender_real_uk": (2, 1e-4, 16, 3, 5e-5), "gender_real_us": (2, 5e-5, 8, 3, 2e-5),
                     "gender_even_uk": (2, 5e-5, 16, 3, 1e-6), "gender_even_us": (2, 1e-4, 8, 3, 1e-6),
                     "race_even_us": (2, 1e-4, 8, 3, 1e-6), "sentiment_even_us": None},
    "llama3.1-8b": {"gender_real_uk": (1, 1e-5, 8, 4, 8e-5), "gender_real_us": (2, 1e-5, 8, 3, 1e-4),
                    "gender_even_uk": (2, 1e-5, 8, 3, 1e-6), "gender_even_us": (5, 1e-5, 8, 3, 5e-5),
                    "race_even_us": (2, 1e-4, 16, 3, 1e-6), "sentiment_even_us": None},
    "llama3.2-1b": {"gender_real_uk": (2, 1e-4, 8, 3, 5e-5), "gender_real_us": (2, 1e-4, 8, 3, 5e-5),
                    "gender_even_uk": (2, 1e-4, 8, 3, 1e-6), "gender_even_us": (2, 1e-4, 8, 3, 1e-6),
                    "race_even_us": (1, 1e-5, 16, 4, 1e-6), "sentiment_even_us": (2, 1e-5, 8, 3, 1e-6)},
    # The original scripts' Gemma-2 runs ("uniform" = our "even").
    "gemma2-2b": {"gender_real_uk": (2, 1e-4, 8, 3, 2e-6), "gender_real_us": (2, 1e-4, 16, 3, 1e-6),
                  "gender_even_uk": (2, 5e-6, 16, 3, 1e-6), "gender_even_us": (2, 1e-4, 8, 3, 1e-6),
                  "race_even_us": (2, 5e-4, 16, 3, 1e-6), "sentiment_even_us": (2, 1e-4, 16, 3, 1e-6)},
    "gemma2-9b": {"gender_real_uk": (2, 2e-4, 16, 3, 1e-6), "gender_real_us": (2, 1e-4, 8, 3, 1e-4),
                  "gender_even_uk": (2, 1e-4, 8, 3, 1e-6), "gender_even_us": (2, 5e-4, 8, 3, 1e-6),
                  "race_even_us": (2, 1e-4, 8, 3, 1e-6), "sentiment_even_us": (2, 1e-4, 8, 3, 1e-6)},
}
# The original baselines: IFT 2 epochs batch 4, DPO 3 epochs batch 1, warmup ratio 0.05.
IFT_EPOCHS, IFT_BATCH, DPO_EPOCHS, DPO_BATCH, WARMUP_RATIO = 2, 4, 3, 1, 0.05
ROWS_PER_OCCUPATION, HELDOUT_FRACTION, DATA_SEED = 100, 0.1, 0


def recipe(model: str, dataset: str) -> tuple[tuple, bool]:
  """-> ((sft_epochs, sft_lr, hybrid_batch, hybrid_epochs, hybrid_lr), given in the paper)."""
  cell = RECIPES[model][dataset]
  return (cell, True) if cell is not None else (_Q7[dataset], False)


def _lr(x: float) -> str:
  """1e-4 -> '1.0e-4' (a YAML float)."""
  mantissa, exponent = f"{x:.1e}".split("e")
  return f"{mantissa}e{int(exponent)}"


def _data(model: str) -> str:
  """The recipe's data section: the pinned template date for Llama 3.x, else nothing."""
  if model not in DATE_PINNED:
    return ""
  return (f"data:\n  chat_template_kwargs: {{date_string: \"{PINNED_DATE}\"}}   "
          f"# the template would write today's date\n")


def method_yaml(model: str, dataset: str) -> str:
  name, lora_file = MODELS[model]
  (se, slr, hb, he, hlr), given = recipe(model, dataset)
  src = ("METHOD.md" if given else
         f"not given in the paper for {name}: METHOD.md's Qwen2.5-7B recipe")
  return f"""\
# GENERATED by configs/experiments/_generate.py; edit that file and rerun it.
# {name} on {dataset}: the paper's method (SFT, then KTO + steering-token KL), LoRA on q/v.
# Recipe ({src}): SFT {se} epochs / lr {_lr(slr)}; hybrid batch {hb} / {he} epochs / lr {_lr(hlr)}.
#   distfair convert hf-to-flax /path/to/{HF_NAMES.get(model, name + "-Instruct")} ckpt/{model}
#   distfair train configs/experiments/{dataset}/{model}.yaml [model.checkpoint=DIR] [run_dir=gs://...]
defaults: [../_recipes/method.yaml, ../_recipes/{lora_file}, ../../models/{model}.yaml, ../../datasets/{dataset}.yaml]
run_dir: runs/{dataset}/{model}
model:
  checkpoint: ckpt/{model}     # placeholder: the `distfair convert hf-to-flax` output directory
sft:
  epochs: {se}
  optim:
    learning_rate: {_lr(slr)}
hybrid:
  batch_size: {hb}
  epochs: {he}
  optim:
    learning_rate: {_lr(hlr)}
{_data(model)}"""


def dataset_train_records(dataset: str) -> dict[str, int]:
  """Training records per kind (after the held-out split) at the recipe's data settings."""
  from distfair_jax.data import build as build_lib
  from distfair_jax.train.heldout import split_heldout
  ds = build_lib.build_dataset(build_lib.resolve_spec(dataset), rows_per_occupation=ROWS_PER_OCCUPATION,
                               test_rounds=0, seed=DATA_SEED, stories_per_occupation=0)
  return {kind: len(split_heldout(rows, HELDOUT_FRACTION, seed=DATA_SEED)[0])
          for kind, rows in ds.records.items() if kind in ("ift", "dpo")}


def baseline_yaml(model: str, dataset: str, counts: dict[str, int]) -> str:
  from distfair_jax.data.pipeline import steps_per_epoch
  name, _ = MODELS[model]
  ift_steps = steps_per_epoch(counts["ift"], "ift", IFT_BATCH) * IFT_EPOCHS
  dpo_steps = steps_per_epoch(counts["dpo"], "dpo", DPO_BATCH) * DPO_EPOCHS
  ift_warm, dpo_warm = (math.ceil(WARMUP_RATIO * s) for s in (ift_steps, dpo_steps))
  return f"""\
# GENERATED by configs/experiments/_generate.py; edit that file and rerun it.
# {name} on {dataset}: the original baselines, IFT then DPO from the IFT adapter (_recipes/baseline.yaml).
# Warmup ratio 0.05 as steps: IFT {counts['ift']} records / batch {IFT_BATCH} x {IFT_EPOCHS} epochs = {ift_steps} steps -> {ift_warm};
# DPO {counts['dpo']} pairs / batch {DPO_BATCH} x {DPO_EPOCHS} epochs = {dpo_steps} steps -> {dpo_warm}.
#   distfair train configs/experiments/{dataset}/{model}-baseline.yaml [model.checkpoint=DIR] [run_dir=...]
defaults: [../_recipes/baseline.yaml, ../../models/{model}.yaml, ../../datasets/{dataset}.yaml]
run_dir: runs/{dataset}/{model}-baseline
model:
  checkpoint: ckpt/{model}     # placeholder: the `distfair convert hf-to-flax` output directory
sft:
  optim:
    warmup_steps: {ift_warm}
dpo:
  optim:
    warmup_steps: {dpo_warm}
{_data(model)}"""


def render() -> dict[str, str]:
  """{path relative to configs/experiments: text} of every generated file."""
  out = {}
  for dataset in DATASETS:
    counts = dataset_train_records(dataset)
    for model in MODELS:
      out[f"{dataset}/{model}.yaml"] = method_yaml(model, dataset)
      out[f"{dataset}/{model}-baseline.yaml"] = baseline_yaml(model, dataset, counts)
  return out


def stale(files: dict[str, str]) -> list[str]:
  """Generated files missing or different on disk."""
  bad = []
  for rel, text in files.items():
    path = os.path.join(HERE, rel)
    if not os.path.exists(path) or open(path, encoding="utf-8").read() != text:
      bad.append(rel)
  return bad


def main(argv: list[str]) -> int:
  files = render()
  if "--check" in argv:
    bad = stale(files)
    for rel in bad:
      print(f"stale: configs/experiments/{rel}", file=sys.stderr)
    return 1 if bad else 0
  for rel, text in files.items():
    path = os.path.join(HERE, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(tmp, path)
  print(f"wrote {len(files)} files under configs/experiments/")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
