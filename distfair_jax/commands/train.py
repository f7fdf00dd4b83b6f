"""Train: run the configured stages (SFT then hybrid KTO + steering KL, or IFT then DPO).

  distfair train configs/experiments/tiny.yaml run_dir=runs/r1 sft.optim.learning_rate=1e-4

Writes checkpoints, metrics.jsonl, TensorBoard events and each stage's final parameters under
run_dir; rerunning the same command resumes from the latest complete checkpoint (an unreadable one is
moved aside and the next older one used). One run at a time holds run_dir (run_dir/lock.json): a
second is refused naming the holder; a dead process's lock on this host is taken over; --force takes
over another host's. Exit codes: 0 done, 1 failure (e.g. a non-finite loss), 2 bad config or input
(also a busy or unusable run_dir), 143 preempted (SIGTERM; checkpoint saved).
"""

from __future__ import annotations

import argparse

DISTRIBUTED = True  # runs as every process of a multi-host job (cli.main starts jax.distributed)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("config", help="experiment YAML (composes base, model and dataset configs)")
  parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                      help="dotted overrides, e.g. run_dir=runs/r1 hybrid.beta=0.2")
  parser.add_argument("--force", action="store_true",
                      help="take over run_dir's lock held by another host's run that is gone")


def run(args: argparse.Namespace) -> int:
  from distfair_jax.config import load_config
  cfg = load_config(args.config, args.overrides)
  import sys
  from distfair_jax.train.loop import Preempted, TrainingError
  from distfair_jax.train.trainer import train
  try:
    summaries = train(cfg, force=args.force)
  except TrainingError as e:
    print(f"distfair train: {e}", file=sys.stderr)
    return 1
  except Preempted:
    return 143
  from distfair_jax import console
  if not console.is_main_process():
    return 0
  for name, s in summaries.items():
    ev = s.get("eval") or {}
    extra = f", held-out steering MAE {ev['steering_mae']:.4f}" if "steering_mae" in ev else ""
    print(f"{name}: {s['steps']} steps, final loss {s['train'].get('loss', float('nan')):.4f}{extra}")
  print(f"run directory: {cfg.run_dir}")
  return 0
