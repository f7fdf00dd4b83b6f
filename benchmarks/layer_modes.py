"""How the layers run, side by side: stage 2's train step on one batch of story pairs under the four
layer modes (``model.scan_layers`` x ``model.remat``).

The step the demo runs from a given model (``distfair demo --model``, ``demo.REAL``; the recipe
file ``configs/experiments/smollm2.yaml``): the hybrid stage (KTO + steering-token KL) with LoRA on
every linear projection, the pooled reference (its log-probs read from the batch), on the packed
layout, one batch of ``--pairs`` story pairs of the dataset (its longest rows: what set a demo's
peak memory). Per mode:

- ``unrolled`` / ``scanned``: the decoder layers as a Python loop or one ``jax.lax.scan`` over
  stacked weights (``model.scan_layers``);
- ``none`` / ``dots`` / ``full``: what the backward pass recomputes instead of keeping
  (``model.remat``).

Each mode runs in a fresh process (its peak resident size its own): the model loaded from the
config, the step lowered and compiled for the batch (the compile time, and XLA's memory analysis:
arguments, outputs, temporaries), then ``--steps`` steps timed, on the same batch. The first
step's loss is printed per mode: from a checkpoint the weights are the same in either layout, and
the losses differ only by the LoRA dropout masks, drawn per layer (the tiny preset of ``--smoke``
is also initialised otherwise when scanned).

  python benchmarks/layer_modes.py --model models/smollm2         # SmolLM2-135M-Instruct, ~15 min
  python benchmarks/layer_modes.py --model models/smollm2 --modes scanned-full,unrolled-none
  python benchmarks/layer_modes.py --smoke                         # the tiny preset, seconds

Results: a table (temporaries, peak resident size, compile and step time, each against the
unrolled, non-rematerialised step) and its JSON under ``--out`` (default
benchmarks/results/layer_modes.json; layer_modes_smoke.json with --smoke).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402  (sets threads before jax is imported)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("unrolled-none", "unrolled-full", "scanned-none", "scanned-full")
KNOWN_MODES = tuple(f"{layers}-{remat}" for layers in ("unrolled", "scanned")
                    for remat in ("none", "dots", "full"))
# The tiny preset with the demo's story pairs and adapters, at sizes that compile in seconds.
SMOKE_OVERRIDES = ["data.stories=true", "data.story_rows_per_occupation=4",
                   "data.pair_story_rows_per_occupation=4", "data.max_length=256",
                   "data.max_prompt_length=240", "data.length_buckets=fine", "lora.enabled=true",
                   "lora.targets=all-linear", "lora.rank=4"]
MIB = 2**20


def _parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", help="a converted model directory (distfair convert gguf-to-flax)")
  p.add_argument("--config", default=None,
                 help="the run config (default configs/experiments/smollm2.yaml; with --smoke "
                      "configs/experiments/tiny.yaml)")
  p.add_argument("--dataset", default="gender_real_us")
  p.add_argument("--modes", default=",".join(MODES),
                 help=f"comma-separated of {', '.join(KNOWN_MODES)}")
  p.add_argument("--pairs", type=int, default=4, help="story pairs in the batch (demo.REAL: 4)")
  p.add_argument("--steps", type=int, default=3, help="timed steps per mode")
  p.add_argument("--smoke", action="store_true", help="the tiny preset: seconds, no figures")
  p.add_argument("--out", default=None)
  p.add_argument("--overwrite", action="store_true")
  p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a mode, in its own process
  args = p.parse_args(argv)
  args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
  bad = [m for m in args.modes if m not in KNOWN_MODES]
  if bad or not args.modes:
    p.error(f"--modes: expected comma-separated of {', '.join(KNOWN_MODES)}, got {bad or 'none'}")
  if not args.smoke and not args.model:
    p.error("--model: expected a converted model directory (or --smoke for the tiny preset)")
  if args.pairs < 1 or args.steps < 1:
    p.error("--pairs, --steps: expected positive integers")
  args.config = args.config or os.path.join(
      ROOT, "configs", "experiments", "tiny.yaml" if args.smoke else "smollm2.yaml")
  args.out = args.out or os.path.join(
      _common.RESULTS_DIR, "layer_modes_smoke.json" if args.smoke else "layer_modes.json")
  return args


def _overrides(args, mode: str) -> list[str]:
  layers, remat = mode.split("-")
  out = list(SMOKE_OVERRIDES) if args.smoke else [f"model.checkpoint={os.path.abspath(args.model)}"]
  return out + [f"data.dataset={args.dataset}", f"model.scan_layers={layers == 'scanned'}",
                f"model.remat={remat}", "hybrid.reference=cached", "hybrid.layout=packed",
                "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"]


def _story_pairs(records: list[dict], pairs: int) -> list[dict]:
  """The ``pairs`` KTO pairs (desirable, undesirable) with the longest responses: story pairs."""
  units = [records[i:i + 2] for i in range(0, len(records) - 1, 2)]
  units.sort(key=lambda u: -max(len(r["response"]) for r in u))
  if len(units) < pairs:
    raise SystemExit(f"layer_modes.py: --pairs: the dataset has {len(units)} KTO pairs")
  return [r for u in units[:pairs] for r in u]


def run_mode(args, mode: str) -> dict:
  """One mode in this process: load, build one story batch, compile, time ``args.steps`` steps."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from distfair_jax import memory
  from distfair_jax import sharding as shd
  from distfair_jax.config import load_config
  from distfair_jax.data import build as build_lib
  from distfair_jax.data import pipeline
  from distfair_jax.data.tokenize import Encoder
  from distfair_jax.model.loader import load_model
  from distfair_jax.train.stages import make_stage
  from distfair_jax.train.state import init_train_state
  from distfair_jax.train.step import memory_line, stage_step

  memory.reset_peak()
  cfg = load_config(args.config, _overrides(args, mode))
  mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  model = load_model(cfg.model, cfg.lora, mesh, seed=cfg.seed)
  records, spec = build_lib.training_records(cfg.data)
  encoder = Encoder.for_data(model.tokenizer, cfg.data, attribute=spec.attribute)
  stage = make_stage("hybrid", cfg)
  chosen = _story_pairs(records["kto"], args.pairs)
  pipe = pipeline.make_batches(chosen, encoder, "kto", 2 * args.pairs, seed=0, layout="packed",
                               shard_index=0, shard_count=1, **stage.batch_options())
  host = next(iter(pipe))
  steering = jnp.asarray(encoder.steering_ids, jnp.int32)
  built = stage_step(stage, model.graphdef, model.graphdef_eval, steering, cfg.hybrid.optim, 100)
  batch = shd.put_batch(host, mesh)
  reference = jax.jit(stage.reference_fn(model.graphdef_eval))
  batch = batch.replace(reference=reference(model.params, model.rngs, model.frozen, batch))
  state = init_train_state(built.tx, jax.tree.map(jnp.copy, model.params), model.rngs, mesh)
  shardings = jax.tree.map(lambda x: x.sharding, state)
  t0 = time.perf_counter()
  compiled = jax.jit(built.step_fn, donate_argnums=(0,), out_shardings=(shardings, None)).lower(
      state, model.frozen, None, batch).compile()
  compile_s = time.perf_counter() - t0
  report = memory_line(mode, compiled)
  sizes = report[1] if report is not None else {}
  times, losses = [], []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, model.frozen, None, batch)
    losses.append(float(np.asarray(jax.device_get(metrics["loss"]))))
    times.append(time.perf_counter() - t0)
  packed = host.packed.input_ids.shape
  return {"mode": mode, "scan_layers": cfg.model.scan_layers, "remat": str(cfg.model.remat),
          "batch_shape": list(packed),
          "tokens": int((np.asarray(host.packed.segment_ids) > 0).sum()),
          "compile_s": round(compile_s, 2), "step_s": [round(t, 3) for t in times],
          "step_s_median": round(statistics.median(times), 3),
          "temporaries_mib": round(sizes.get("temp_size_in_bytes", 0) / MIB, 1),
          "arguments_mib": round(sizes.get("argument_size_in_bytes", 0) / MIB, 1),
          "peak_resident_mib": round(memory.peak_resident_bytes() / MIB, 1),
          "first_step_loss": losses[0], "trainable_params": int(model.num_trainable),
          "model": model.name}


def _in_subprocess(args, mode: str) -> dict:
  """``run_mode`` in a fresh interpreter: each mode's peak resident size and compile its own."""
  argv = [sys.executable, os.path.abspath(__file__), "--one", mode, "--pairs", str(args.pairs),
          "--steps", str(args.steps), "--config", args.config, "--dataset", args.dataset,
          "--out", args.out] + (["--smoke"] if args.smoke else ["--model", args.model])
  proc = subprocess.run(argv, capture_output=True, text=True)
  if proc.returncode != 0:
    raise SystemExit(f"layer_modes.py: mode {mode} failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
  args = _parse_args(argv)
  if args.one is None and _common.refuses_out("layer_modes.py", args.out, args.overwrite):
    return 2
  _common.start(args.smoke)
  if args.one is not None:
    print(json.dumps(run_mode(args, args.one)))
    return 0
  results = []
  for mode in args.modes:
    results.append(_in_subprocess(args, mode))
    r = results[-1]
    print(f"{mode}: temporaries {r['temporaries_mib']:,.0f} MiB, compile {r['compile_s']} s, "
          f"step {r['step_s_median']} s", flush=True)
  base = next((r for r in results if r["mode"] == "unrolled-none"), results[0])
  ratio = lambda r, k: round(r[k] / base[k], 3) if base[k] else None
  rows = [[r["mode"], r["temporaries_mib"], ratio(r, "temporaries_mib"), r["peak_resident_mib"],
           r["compile_s"], r["step_s_median"], ratio(r, "step_s_median"),
           f"{r['first_step_loss']:.6f}"] for r in results]
  print(f"\nstage 2's step on {args.pairs} packed story pairs (batch {results[0]['batch_shape']}, "
        f"{results[0]['tokens']} tokens), {results[0]['model']}, LoRA "
        f"{results[0]['trainable_params'] / 1e6:.1f}M trainable; ratios against {base['mode']}")
  print(_common.table(rows, ["mode", "temporaries MiB", "x", "peak RSS MiB", "compile s",
                             "step s", "x", "first loss"]))
  spread = max(r["first_step_loss"] for r in results) - min(r["first_step_loss"] for r in results)
  print(f"first step's loss: the largest difference between modes {spread:.2e}")
  doc = {"benchmark": "layer_modes", "command": _common.command_line(),
         "machine": _common.machine_info(), "model": args.model or "tiny", "config": args.config,
         "dataset": args.dataset, "pairs": args.pairs, "steps": args.steps,
         "baseline": base["mode"], "first_loss_spread": spread, "modes": results}
  _common.write_json(args.out, doc, overwrite=True)
  print(f"results: {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
