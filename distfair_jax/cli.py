"""The ``distfair`` command-line entry point.

Each subcommand lives in its own module under ``distfair_jax/commands/`` and exposes
``add_arguments(parser)`` and ``run(args) -> int``; its docstring's first line is its help text.
Modules are imported lazily so that ``distfair --help`` stays fast.

Commands whose module sets ``DISTRIBUTED = True`` (train, eval, export, report) run as every process
of a multi-host job: the JAX distributed runtime is started for them before they run.

Options and ``KEY=VALUE`` overrides may come in either order (``distfair eval RUN --overwrite
rounds=1`` as ``distfair eval RUN rounds=1 --overwrite``).

Exit codes: 0 success, 1 failure, 2 bad usage or bad input (``InputError``).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys

from distfair_jax.errors import InputError

# name -> module implementing it (in the order `distfair --help` lists them)
COMMANDS: dict[str, str] = {
    "demo": "distfair_jax.commands.demo",
    "data": "distfair_jax.commands.data",
    "train": "distfair_jax.commands.train",
    "eval": "distfair_jax.commands.eval",
    "report": "distfair_jax.commands.report",
    "convert": "distfair_jax.commands.convert",
    "export": "distfair_jax.commands.export",
    "config": "distfair_jax.commands.config",
    "plan": "distfair_jax.commands.plan",
}


def _load(name: str):
  return importlib.import_module(COMMANDS[name])


def version_line() -> str:
  """``distfair VERSION (jax ..., flax ..., orbax-checkpoint ...)``: what a bug report needs."""
  from distfair_jax import __version__

  def installed(dist: str) -> str:
    try:
      return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
      return "not installed"
  libs = ", ".join(f"{d} {installed(d)}" for d in ("jax", "flax", "orbax-checkpoint"))
  return f"distfair {__version__} ({libs})"


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="distfair",
      description="Distribution-aligned fine-tuning of LLMs in JAX (arXiv 2604.05756).")
  parser.add_argument("--version", action="version", version=version_line())
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  sub.required = True
  for name in COMMANDS:
    module = _load(name)
    doc = (module.__doc__ or name).strip().splitlines()[0]
    p = sub.add_parser(name, help=doc, description=(module.__doc__ or doc).strip(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(p)
    p.set_defaults(_module=module, _parser=p)
  return parser


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
  """``parser.parse_args``, with ``KEY=VALUE`` overrides accepted after options too (argparse
  leaves those unparsed: its positionals are matched before the first option)."""
  args, extra = parser.parse_known_args(argv)
  if extra:
    if hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
      args.overrides = [*(args.overrides or []), *extra]
    else:
      getattr(args, "_parser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
  return args


def main(argv: list[str] | None = None) -> int:
  parser = build_parser()
  args = parse(parser, argv)
  try:
    if getattr(args._module, "DISTRIBUTED", False):  # multi-host: before any device is touched
      from distfair_jax.distributed import maybe_initialize
      maybe_initialize(f"distfair {args.command}")
    return int(args._module.run(args) or 0)
  except InputError as e:
    print(f"distfair {args.command}: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"distfair {args.command}: interrupted", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())
