"""Rebuild a run's evaluation report (report.md and PNG plots) from RUN/eval/metrics.json.

The metrics file is the source of truth and is left untouched; report.md and eval/plots/*.png are
regenerated from it (they are derived files, so they are replaced without --overwrite).

  distfair report runs/gender_real_uk
"""

from __future__ import annotations

import argparse

DISTRIBUTED = True  # runs as every process of a multi-host job (cli.main starts jax.distributed)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("run_dir", metavar="RUN_DIR",
                      help="run directory holding eval/metrics.json (written by `distfair eval`)")
  parser.add_argument("--no-plots", action="store_true", help="write report.md only, no PNG plots")


def run(args: argparse.Namespace) -> int:
  import jax
  from distfair_jax.evaluation.report import rebuild_report
  if jax.process_index() != 0:  # multi-host: one writer
    return 0
  written = rebuild_report(args.run_dir, plots=not args.no_plots)
  for path in written.values():
    print(path)
  return 0
