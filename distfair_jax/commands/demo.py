"""Demo: the miniature benchmark on the built-in tiny model (biased base, baselines, ours, ablations).

  distfair demo                               # gender_real_us, under runs/demo, about 6 minutes on 2 CPU cores
  distfair demo --quick                       # a small version for smoke tests (2-3 minutes)
  distfair demo --dataset race_even_us
  distfair demo --quick --dataset configs/datasets/age_groups_us.yaml   # your own attribute (a YAML spec)
  distfair demo --all                         # the six datasets
  distfair demo --model models/smollm2 --dataset gender_real_us --dataset gender_even_us
                                              # from a real instruct model (LoRA), no base training
  distfair demo --model models/smollm2 --lora-targets q_proj,v_proj   # the paper's adapters
  distfair demo --model models/smollm2 --dataset race_even_us --rates sft=1e-3,ift=1e-3,ours=5e-4,dpo=1e-5
                                              # rates known beforehand: no grids

Ends with the comparison table (MAE with 95% bootstrap CIs, per method and test version) and writes
results.json, results.md and comparison.png under --run-dir, plus each method's eval/ directory.
Rerunning reuses finished stages; --fresh starts over.
"""

from __future__ import annotations

import argparse

from distfair_jax.errors import InputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
  group = parser.add_mutually_exclusive_group()
  group.add_argument("--dataset", action="append", default=None,
                     help="a built-in dataset or a YAML spec of your own attribute; repeat for "
                          "several (default gender_real_us)")
  group.add_argument("--all", action="store_true", help="all six datasets")
  parser.add_argument("--quick", action="store_true", help="small sizes, for CI and smoke tests")
  parser.add_argument("--model", default=None,
                      help="start every method from this converted model directory (`distfair "
                           "convert gguf-to-flax` / `hf-to-flax`) instead of the biased base "
                           "trained here: LoRA fine-tuning (every linear projection; rank 32, "
                           "alpha 16, dropout 0.05), the model's own tokenizer and chat template, "
                           "the sizes of demo.REAL")
  parser.add_argument("--lora-targets", default=None,
                      help="with --model: the projections that get adapters, comma-separated "
                           "(default all-linear; the paper's: q_proj,v_proj), for every trained "
                           "method")
  parser.add_argument("--steering-placement", default=None, choices=["assistant", "user_turn"],
                      help="where the steered methods' steering token goes: assistant (the first "
                           "answer token, default) or user_turn (the end of the question, as in "
                           "the original code)")
  parser.add_argument("--rates", default=None,
                      help="learning rates fixed beforehand, e.g. sft=1e-3,ift=1e-3,ours=5e-4,"
                           "dpo=1e-5: each named method trains at its rate instead of its grid "
                           "(names: sft, ift, dpo, ours, kl_only, kto_only)")
  parser.add_argument("--nll-weight", type=float, default=None,
                      help="stage 2 of the steered methods adds this weight times the desirable "
                           "completions' NLL per token (hybrid.nll_weight; default 0, the "
                           "paper's objective); its runs are named <method>_lr<rate>_nll<weight>")
  parser.add_argument("--ablations", default=None,
                      help="the datasets whose runs include the ablations kl_only and kto_only: "
                           "all, none or comma-separated names (default: all; with --model, "
                           "gender_real_us where it is run, the others none)")
  parser.add_argument("--seed", type=int, default=0, help="one seed (default 0)")
  parser.add_argument("--seeds", default=None,
                      help="several seeds, comma-separated (e.g. 0,1,2): each a whole demo under "
                           "RUN_DIR/seed<N>, reused on a rerun; results are mean and standard "
                           "deviation over them")
  parser.add_argument("--run-dir", default=None, help="default runs/demo (runs/demo-quick with --quick)")
  parser.add_argument("--fresh", action="store_true", help="delete --run-dir first")
  parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _seeds(text: str) -> list[int]:
  try:
    seeds = [int(x) for x in str(text).split(",") if x.strip()]
  except ValueError:
    seeds = []
  if not seeds:
    raise InputError(f"demo: --seeds: expected comma-separated integers such as 0,1,2, got "
                     f"{text!r}")
  return seeds


def _ablations(args: argparse.Namespace, datasets: list[str]) -> list[str] | None:
  """The datasets whose runs include the ablations (None: all of them)."""
  from distfair_jax.data.build import resolve_spec
  text = args.ablations
  if text is None:  # from a given model: on gender_real_us only (the ablations' dataset)
    if not args.model:
      return None
    return [n for n in (resolve_spec(d).name for d in datasets) if n == "gender_real_us"]
  if text.strip() == "all":
    return None
  if text.strip() == "none":
    return []
  return [x.strip() for x in text.split(",") if x.strip()]


def run(args: argparse.Namespace) -> int:
  import os
  import jax
  from distfair_jax import demo
  from distfair_jax.data.build import DATASETS
  datasets = list(DATASETS) if args.all else (args.dataset or ["gender_real_us"])
  if args.run_dir:
    run_dir = args.run_dir
  elif args.model:
    run_dir = f"runs/demo-{os.path.basename(os.path.normpath(args.model))}"
  else:
    run_dir = "runs/demo-quick" if args.quick else "runs/demo"
  targets = None
  if args.lora_targets is not None:
    targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    if not targets:
      raise InputError(f"demo: --lora-targets: expected projection names such as "
                       f"q_proj,v_proj or all-linear, got {args.lora_targets!r}")
  rates = demo.parse_rates(args.rates) if args.rates is not None else ()
  settings = demo.settings_for(quick=args.quick, model=args.model, lora_targets=targets,
                               steering_placement=args.steering_placement, rates=rates,
                               nll_weight=args.nll_weight)
  # This process's compilation cache (it runs the demo and nothing else): identical programs
  # (learning-rate grid points, datasets of one attribute) compile once.
  jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.abspath(run_dir), ".jax_cache"))
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  seeds = _seeds(args.seeds) if args.seeds is not None else None
  results = demo.run_demo(datasets, run_dir, quick=args.quick, seed=args.seed, seeds=seeds,
                          fresh=args.fresh, progress=not args.no_progress, model=args.model,
                          settings=settings, ablations=_ablations(args, datasets))
  table = demo.seeds_table if seeds and len(seeds) > 1 else demo.results_table
  print(table(results, settings.versions))
  print(f"results: {os.path.join(run_dir, 'results.json')}; plots: "
        f"{os.path.join(run_dir, 'comparison.png')} and {run_dir}/<dataset>/<method>/eval/plots/")
  return 0
