"""Plan: parameter count and per-device memory of a config on N devices, before renting them.

  distfair plan configs/experiments/gender_real_uk/llama3.1-8b.yaml --devices 16
  distfair plan configs/experiments/gender_real_uk/llama3.2-1b.yaml --devices 16 --mesh fsdp=16 --no-compile
  distfair plan configs/experiments/tiny.yaml data.max_length=256 --devices 4 --stage hybrid

KEY=VALUE overrides go right after CONFIG, before the options. Prints the parameter count, the trainable count (LoRA adapters or all), and per device: parameters,
optimizer state and the initial / reference copy of the trainable parameters (from jax.eval_shape:
instant, nothing allocated), then the memory of each stage's compiled train step (XLA's
memory_analysis of the step `distfair train` runs, lowered on abstract inputs of the stage's batch
size x data.max_length and compiled for N simulated CPU devices; the command sets
XLA_FLAGS=--xla_force_host_platform_device_count=N itself). Compiling a 7-8B hybrid step on a CPU takes
minutes: --no-compile skips that part. --mesh overrides the config's mesh (missing axes: 1; -1 fills).
Exit codes: 0 success, 1 failure (e.g. compilation failed), 2 bad usage or bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

_FLAG = "--xla_force_host_platform_device_count"
_REEXEC = "DISTFAIR_PLAN_CHILD"


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("config", help="experiment YAML")
  parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                      help="dotted overrides, e.g. hybrid.batch_size=16 data.max_length=512")
  parser.add_argument("--devices", type=int, required=True, metavar="N",
                      help="number of devices of the slice to plan for (e.g. 16 for v5litepod-16)")
  parser.add_argument("--mesh", default=None, metavar="data=..,fsdp=..,tensor=..",
                      help="mesh axis sizes (default: the config's mesh)")
  parser.add_argument("--stage", action="append", default=None, metavar="STAGE",
                      help="compile only this stage's step (repeatable; default: every configured stage)")
  parser.add_argument("--no-compile", action="store_true",
                      help="skip the compiled step (parameters and optimizer state only; instant)")
  parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def _argv(args: argparse.Namespace) -> list[str]:
  argv = ["plan", args.config, *args.overrides, "--devices", str(args.devices)]
  if args.mesh is not None:
    argv += ["--mesh", args.mesh]
  for stage in args.stage or []:
    argv += ["--stage", stage]
  if args.no_compile:
    argv.append("--no-compile")
  if args.json:
    argv.append("--json")
  return argv


def _cpu_devices(n: int):
  """N CPU devices when this process was started with them (``JAX_PLATFORMS=cpu`` and
  ``XLA_FLAGS=--xla_force_host_platform_device_count>=N``, as ``_reexec`` starts it); else None, and
  the caller runs the plan in a fresh interpreter that is. Nothing process-wide is changed here."""
  counts = [f.split("=", 1)[1] for f in os.environ.get("XLA_FLAGS", "").split()
            if f.startswith(_FLAG + "=")]
  if os.environ.get("JAX_PLATFORMS") != "cpu" or not counts or int(counts[-1]) < n:
    return None
  import jax
  devices = jax.devices("cpu")
  return devices[:n] if len(devices) >= n else None


def _reexec(args: argparse.Namespace) -> int:
  """Run the same plan in a fresh interpreter whose CPU backend gets ``args.devices`` devices."""
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(_FLAG)]
  env["XLA_FLAGS"] = " ".join(flags + [f"{_FLAG}={args.devices}"])
  env["JAX_PLATFORMS"] = "cpu"
  env[_REEXEC] = "1"
  return subprocess.call([sys.executable, "-m", "distfair_jax.cli", *_argv(args)], env=env)


def run(args: argparse.Namespace) -> int:
  from distfair_jax.errors import InputError
  if args.devices < 1:
    raise InputError(f"--devices: expected a positive integer, got {args.devices}")
  from distfair_jax.config import load_config
  cfg = load_config(args.config, args.overrides)  # bad config -> exit 2 before anything compiles
  stages = args.stage or list(cfg.stages)
  from distfair_jax import plan as plan_lib
  from distfair_jax.train.stages import STAGES
  for stage in stages:
    if stage not in STAGES:
      raise InputError(f"--stage: expected one of {', '.join(STAGES)}, got {stage!r}")
  import dataclasses
  sizes = plan_lib.parse_mesh(args.mesh, dataclasses.asdict(cfg.mesh), args.devices)
  devices = None if args.no_compile else _cpu_devices(args.devices)
  if devices is None and not args.no_compile:
    if os.environ.get(_REEXEC):
      print(f"distfair plan: could not start {args.devices} CPU devices (XLA_FLAGS={_FLAG})",
            file=sys.stderr)
      return 1
    return _reexec(args)
  state = plan_lib.state_plan(cfg, sizes)
  steps = []
  if not args.no_compile:
    for stage in stages:
      try:
        steps.append(plan_lib.compiled_step_memory(cfg, stage, devices, sizes))
      except InputError:
        raise
      except Exception as e:  # XLA / lowering failures: report, exit 1
        print(f"distfair plan: {stage}: compiling the step failed: {type(e).__name__}: "
              f"{str(e).strip().splitlines()[0] if str(e).strip() else ''} (`distfair train` compiles the "
              f"same step)", file=sys.stderr)
        return 1
  if args.json:
    out = {"model": state.model, "model_source": state.model_source, "devices": args.devices,
           "mesh": state.mesh, "param_dtype": state.param_dtype, "lora": state.lora,
           "num_params": state.num_params, "trainable_params": state.trainable_params,
           "state": [dataclasses.asdict(l) for l in state.lines],
           "resident_bytes_per_device": state.per_device_total,
           "steps": [dict(dataclasses.asdict(s), peak_bytes=s.peak_bytes) for s in steps],
           "warnings": state.warnings}
    print(json.dumps(out, indent=2))
  else:
    print(plan_lib.format_plan(state, steps, args.devices,
                               skipped="compiled step: skipped (--no-compile)" if args.no_compile else ""))
  return 0
