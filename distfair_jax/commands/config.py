"""Config: show the resolved config of a YAML file with overrides.

  distfair config show configs/experiments/tiny.yaml run_dir=runs/x
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
  sub = parser.add_subparsers(dest="action", metavar="ACTION")
  sub.required = True
  show = sub.add_parser("show", help="print the resolved config as YAML")
  show.add_argument("config", nargs="?", default=None, help="experiment YAML (default: only the schema)")
  show.add_argument("overrides", nargs="*", metavar="KEY=VALUE")


def run(args: argparse.Namespace) -> int:
  from distfair_jax.config import config_to_yaml, load_config
  config, overrides = args.config, list(args.overrides)
  if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
    config, overrides = None, [config] + overrides
  print(config_to_yaml(load_config(config, overrides)), end="")
  return 0
