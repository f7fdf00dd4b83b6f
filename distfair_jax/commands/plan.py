"""Plan: parameter count and per-device memory of a config on a TPU slice or N devices, before renting them.

  distfair plan configs/experiments/gender_real_uk/llama3.2-1b.yaml --topology v5e:4x4
  distfair plan configs/experiments/gender_real_uk/llama3.1-8b.yaml --topology v6e:2x4 --stage hybrid --json
  distfair plan configs/experiments/gender_real_uk/llama3.1-8b.yaml --devices 16
  distfair plan configs/experiments/gender_real_uk/llama3.2-1b.yaml --devices 16 --mesh fsdp=16 --no-compile
  distfair plan configs/experiments/tiny.yaml data.max_length=256 --devices 4 --stage hybrid

KEY=VALUE overrides go right after CONFIG, before the options. Prints the parameter count, the
trainable count (LoRA adapters or all), and per device: parameters, optimizer state and the initial /
reference copy of the trainable parameters (from jax.eval_shape: instant, nothing allocated), then
the memory of each stage's compiled train step (XLA's memory_analysis of the step `distfair train`
runs, lowered on abstract inputs of the stage's batch size x data.max_length).

--topology GEN:SHAPE (v4:AxBxC, v5p:AxBxC, v5e:AxB, v6e:AxB; e.g. v5e:4x4 is a v5litepod-16) compiles
the step with the real TPU compiler for that slice, on this CPU host (libtpu: pip install
"distfair_jax[tpu]"; no TPU needed), and prints per chip: arguments, temporaries and the peak against
the chip's HBM, the FLOPs per step (XLA's cost_analysis, next to our formula's) and the step time they
take at the chip's bf16 peak. A step that does not fit in HBM: one line naming it, exit 1.
--devices N compiles instead for N simulated CPU devices (the command sets
XLA_FLAGS=--xla_force_host_platform_device_count=N itself; XLA's CPU backend lays temporaries out
unlike the TPU's: an estimate). Compiling a 7-8B step on a CPU takes minutes: --no-compile skips it.
--mesh overrides the config's mesh (missing axes: 1; -1 fills).
Exit codes: 0 success, 1 failure (a step does not fit, or compilation failed), 2 bad usage or input.
"""

from __future__ import annotations

import argparse
import dataclasses
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
  where = parser.add_mutually_exclusive_group(required=True)
  where.add_argument("--topology", default=None, metavar="GEN:SHAPE",
                     help="a TPU slice, e.g. v5e:4x4 (v5litepod-16), v6e:2x4 (v6e-8), v4:2x2x2 "
                          "(v4-16): compile with the TPU compiler (libtpu) for its chips")
  where.add_argument("--devices", type=int, default=None, metavar="N",
                     help="number of simulated CPU devices to compile for (e.g. 16 for v5litepod-16)")
  parser.add_argument("--mesh", default=None, metavar="data=..,fsdp=..,tensor=..",
                      help="mesh axis sizes (default: the config's mesh)")
  parser.add_argument("--stage", action="append", default=None, metavar="STAGE",
                      help="compile only this stage's step (repeatable; default: every configured stage)")
  parser.add_argument("--no-compile", action="store_true",
                      help="skip the compiled step (parameters and optimizer state only; instant)")
  parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def _argv(args: argparse.Namespace) -> list[str]:
  where = ["--topology", args.topology] if args.topology else ["--devices", str(args.devices)]
  argv = ["plan", args.config, *args.overrides, *where]
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


def _tpu_ready(quiet: dict[str, str]) -> bool:
  """Whether this process can compile for a TPU slice as it is: ``JAX_PLATFORMS=cpu`` (no TPU
  runtime is started, even on a TPU VM) and libtpu's slice variables set (it logs no warnings)."""
  return os.environ.get("JAX_PLATFORMS") == "cpu" and all(k in os.environ for k in quiet)


def _reexec(args: argparse.Namespace, env_update: dict[str, str]) -> int:
  """Run the same plan in a fresh interpreter with ``env_update`` and ``JAX_PLATFORMS=cpu``."""
  env = dict(os.environ, **env_update, JAX_PLATFORMS="cpu")
  env[_REEXEC] = "1"
  return subprocess.call([sys.executable, "-m", "distfair_jax.cli", *_argv(args)], env=env)


def _cpu_env(n: int) -> dict[str, str]:
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(_FLAG)]
  return {"XLA_FLAGS": " ".join(flags + [f"{_FLAG}={n}"])}


def _compile_failed(stage: str, e: Exception) -> int:
  first = str(e).strip().splitlines()[0] if str(e).strip() else ""
  print(f"distfair plan: {stage}: compiling the step failed: {type(e).__name__}: {first} "
        f"(`distfair train` compiles the same step)", file=sys.stderr)
  return 1


def _state_json(state, num_devices: int) -> dict:
  return {"model": state.model, "model_source": state.model_source, "devices": num_devices,
          "mesh": state.mesh, "param_dtype": state.param_dtype, "lora": state.lora,
          "num_params": state.num_params, "trainable_params": state.trainable_params,
          "state": [dataclasses.asdict(l) for l in state.lines],
          "resident_bytes_per_device": state.per_device_total, "warnings": state.warnings}


def _load(args: argparse.Namespace):
  """-> (config, stages, topology or None, num_devices, mesh sizes); InputError on bad input."""
  from distfair_jax.plan import memory as plan_lib
  from distfair_jax import tpu
  from distfair_jax.config import load_config
  from distfair_jax.errors import InputError
  from distfair_jax.train.stages import STAGES
  topology = tpu.parse_topology(args.topology) if args.topology is not None else None
  if topology is None and args.devices < 1:
    raise InputError(f"--devices: expected a positive integer, got {args.devices}")
  cfg = load_config(args.config, args.overrides)  # bad config -> exit 2 before anything compiles
  stages = args.stage or list(cfg.stages)
  for stage in stages:
    if stage not in STAGES:
      raise InputError(f"--stage: expected one of {', '.join(STAGES)}, got {stage!r}")
  n = topology.num_chips if topology is not None else args.devices
  sizes = plan_lib.parse_mesh(args.mesh, dataclasses.asdict(cfg.mesh), n)
  return cfg, stages, topology, n, sizes


def run(args: argparse.Namespace) -> int:
  cfg, stages, topology, n, sizes = _load(args)
  if topology is not None:
    return _run_topology(args, cfg, stages, topology, sizes)
  from distfair_jax.plan import memory as plan_lib
  from distfair_jax.errors import InputError
  devices = None if args.no_compile else _cpu_devices(n)
  if devices is None and not args.no_compile:
    if os.environ.get(_REEXEC):
      print(f"distfair plan: could not start {n} CPU devices (XLA_FLAGS={_FLAG})", file=sys.stderr)
      return 1
    return _reexec(args, _cpu_env(n))
  state = plan_lib.state_plan(cfg, sizes)
  steps = []
  for stage in [] if args.no_compile else stages:
    try:
      steps.append(plan_lib.compiled_step_memory(cfg, stage, devices, sizes))
    except InputError:
      raise
    except Exception as e:  # XLA / lowering failures: report, exit 1
      return _compile_failed(stage, e)
  if args.json:
    out = _state_json(state, n)
    out["steps"] = [dict(dataclasses.asdict(s), peak_bytes=s.peak_bytes) for s in steps]
    print(json.dumps(out, indent=2))
  else:
    print(plan_lib.format_plan(state, steps, n,
                               skipped="compiled step: skipped (--no-compile)" if args.no_compile else ""))
  return 0


def _run_topology(args, cfg, stages, topology, sizes) -> int:
  """The plan on a TPU slice: each stage compiled by libtpu for its chips, per chip vs HBM."""
  from distfair_jax.plan import memory as plan_lib
  from distfair_jax import tpu
  from distfair_jax.plan import tpu_slice as plan_tpu
  from distfair_jax.errors import InputError
  if not args.no_compile:
    if not tpu.libtpu_available():
      raise InputError(f"--topology: {topology.name}: {tpu.LIBTPU_MISSING}")
    quiet = tpu.quiet_env(topology)
    if not _tpu_ready(quiet) and not os.environ.get(_REEXEC):
      return _reexec(args, quiet)
  state = plan_lib.state_plan(cfg, sizes)
  steps = []
  if not args.no_compile:
    devices = tpu.compile_devices(topology)
    for stage in stages:
      try:
        steps.append(plan_tpu.chip_step(cfg, stage, topology, devices, sizes))
      except InputError:
        raise
      except Exception as e:  # XLA / lowering failures other than out of HBM: report, exit 1
        return _compile_failed(stage, e)
  if args.json:
    out = dict(_state_json(state, topology.num_chips), topology=plan_tpu.topology_json(topology))
    out["steps"] = [plan_tpu.chip_step_json(s) for s in steps]
    print(json.dumps(out, indent=2))
  else:
    print(plan_lib.format_plan(state, [], topology.num_chips,
                               skipped="compiled step: skipped (--no-compile)" if args.no_compile else ""))
    if steps:
      print("\n" + plan_tpu.format_chip_steps(steps, topology))
  over = [plan_tpu.does_not_fit(s) for s in steps if not s.fits]
  if over:
    print(f"distfair plan: {'; '.join(over)}", file=sys.stderr)
    return 1
  return 0
