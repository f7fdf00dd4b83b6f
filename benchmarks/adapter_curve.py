"""Which adapters learn the per-occupation steering distribution: a learning curve, side by side.

The steering calibration alone (``hybrid.ablation: kl_only``: the steering-token KL to each
occupation's target, no SFT before it) from a converted instruct model, with the same data, batches,
seed and number of steps for each side:

- ``qv``: LoRA on q_proj and v_proj (the paper's adapters), rank 32, alpha 16, dropout 0.05
- ``all-linear``: the same LoRA on every linear projection (``lora.targets: all-linear``)
- ``full``: full fine-tuning

Every ``--every`` steps, and at the end, ``distfair train``'s held-out evaluation records the exact
steering MAE on the held-out *training* prompts (``heldout.every_steps``: the mean over held-out
prompts of mean_k |P(digit k) - target_k|, the digits' probabilities at the steering position read
from the logits, not sampled). Each side is one ``distfair train`` run (``trainer.train``, the path a
user takes) under ``--run-dir/<side>``; a rerun reuses a finished side.

  python benchmarks/adapter_curve.py --model models/smollm2            # SmolLM2-135M-Instruct
  python benchmarks/adapter_curve.py --model models/smollm2 --sides qv,all-linear --steps 40
  python benchmarks/adapter_curve.py --smoke                          # the tiny preset, seconds

Results: a table of the held-out exact steering MAE per step and side, its JSON under ``--out``
(default benchmarks/results/adapter_curve.json; adapter_curve_smoke.json with --smoke) and the
figure ``--plot`` (default docs/adapter_curve.png; none with --smoke unless given).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402  (sets threads before jax is imported)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# side -> (config overrides, learning rate): LoRA at 1e-3, full fine-tuning at 3e-5 (a LoRA rate
# diverges there; 3e-5 is the usual full fine-tuning rate of a model this size).
SIDES = {
    "qv": (["lora.enabled=true", "lora.targets=[q_proj,v_proj]"], 1e-3),
    "all-linear": (["lora.enabled=true", "lora.targets=all-linear"], 1e-3),
    "full": (["lora.enabled=false"], 3e-5),
}


def _parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", help="a converted model directory (distfair convert gguf-to-flax)")
  p.add_argument("--dataset", default="gender_real_us")
  p.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated of {', '.join(SIDES)}")
  p.add_argument("--rows", type=int, default=16, help="data.rows_per_occupation")
  p.add_argument("--epochs", type=int, default=2, help="hybrid.epochs")
  p.add_argument("--batch", type=int, default=8, help="hybrid.batch_size (rows: pairs x 2)")
  p.add_argument("--steps", type=int, default=0, help="hybrid.max_steps (0: the epochs' steps)")
  p.add_argument("--every", type=int, default=10, help="held-out evaluation every N steps")
  p.add_argument("--rank", type=int, default=32)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--run-dir", default=None, help="where the runs go (default: runs/adapter_curve)")
  p.add_argument("--smoke", action="store_true", help="the built-in tiny model, a few steps")
  p.add_argument("--out", default=None)
  p.add_argument("--plot", default=None)
  p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
  args = p.parse_args(argv)
  args.sides = [s for s in args.sides.split(",") if s]
  bad = [s for s in args.sides if s not in SIDES]
  if bad or not args.sides:
    p.error(f"--sides: expected some of {', '.join(SIDES)}, got {args.sides}")
  if not args.smoke and not args.model:
    p.error("--model: expected a converted model directory (or --smoke)")
  suffix = "_smoke" if args.smoke else ""
  args.out = args.out or os.path.join(_common.RESULTS_DIR, f"adapter_curve{suffix}.json")
  if args.plot is None and not args.smoke:
    args.plot = os.path.join(ROOT, "docs", "adapter_curve.png")
  args.run_dir = os.path.abspath(args.run_dir or os.path.join("runs", f"adapter_curve{suffix}"))
  return args


def _overrides(args, side: str) -> list[str]:
  extra, lr = SIDES[side]
  model = (["model.preset=tiny", "data.max_length=128", "data.max_prompt_length=112"] if args.smoke
           else [f"model.checkpoint={os.path.abspath(args.model)}", "model.dtype=float32",
                 "model.param_dtype=float32", "data.max_length=256",
                 "data.max_prompt_length=240"])
  return model + extra + [
      f"run_dir={os.path.join(args.run_dir, side)}", f"seed={args.seed}", "stages=[hybrid]",
      f"data.dataset={args.dataset}", f"data.rows_per_occupation={args.rows}",
      f"data.seed={args.seed}", f"lora.rank={args.rank}", "lora.alpha=16", "lora.dropout=0.05",
      "hybrid.ablation=kl_only", f"hybrid.epochs={args.epochs}", f"hybrid.batch_size={args.batch}",
      f"hybrid.max_steps={args.steps}", f"hybrid.optim.learning_rate={lr}",
      "hybrid.optim.warmup_steps=5", "hybrid.optim.weight_decay=0.0",
      f"heldout.every_steps={args.every}", "heldout.max_batches=1000",
      "checkpoint.every_steps=0", "checkpoint.async_save=false", "logging.every_steps=5",
      "logging.tensorboard=false", "logging.progress=false"]


def _curve(run_dir: str) -> list[tuple[int, float]]:
  """(step, held-out exact steering MAE) of a run's hybrid stage, in step order."""
  from distfair_jax import fileio
  rows = {}
  for _, row in fileio.read_jsonl(os.path.join(run_dir, "metrics.jsonl")):
    if row.get("stage") == "hybrid" and row.get("split") == "eval" and "steering_mae" in row:
      rows[int(row["step"])] = float(row["steering_mae"])
  return sorted(rows.items())


def _run_side(args, side: str) -> dict:
  from distfair_jax import config as C
  from distfair_jax import fileio
  from distfair_jax.train.rundir import RunDir
  from distfair_jax.train.trainer import train
  overrides = _overrides(args, side)
  cfg = C.load_config(os.path.join(ROOT, "configs", "base.yaml"), overrides)
  run = RunDir(cfg.run_dir)
  timing = os.path.join(cfg.run_dir, "adapter_curve_wall.json")
  if not run.stage_done("hybrid"):
    start = time.perf_counter()
    train(cfg)
    fileio.write_json(timing, {"wall_s": round(time.perf_counter() - start, 1)})
  wall = fileio.read_json(timing)["wall_s"] if os.path.exists(timing) else None
  summary = run.summary("hybrid")
  return {"side": side, "overrides": overrides, "learning_rate": SIDES[side][1],
          "steps": summary["steps"], "curve": _curve(cfg.run_dir),
          "wall_s": wall,
          "final_steering_mae": summary["eval"].get("steering_mae")}


def marginal_mae(dataset: str) -> float:
  """The exact steering MAE of one distribution for every occupation, the targets' mean: what a
  model scores that learned the marginal and nothing per occupation."""
  import numpy as np
  from distfair_jax.data.build import resolve_spec
  spec = resolve_spec(dataset)
  t = np.stack([spec.target(o) for o in spec.occupations])
  return float(np.mean(np.abs(t - t.mean(0))))


def _plot(results: list[dict], path: str, title: str, marginal: float) -> None:
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(6.4, 3.8))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  labels = {"qv": "LoRA q, v (the paper's)", "all-linear": "LoRA all-linear", "full": "full"}
  for r in results:
    steps, mae = zip(*r["curve"]) if r["curve"] else ((), ())
    ax.plot(steps, mae, marker="o", markersize=3,
            label=f"{labels[r['side']]}, lr {r['learning_rate']:g}")
  ax.axhline(marginal, color="grey", linestyle="--", linewidth=1,
             label=f"the targets' mean for every occupation ({marginal:.3f})")
  ax.set_xlabel("optimizer step (steering KL alone, batch of 4 pairs)")
  ax.set_ylabel("held-out exact steering MAE")
  ax.set_ylim(bottom=0)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)


def main(argv=None) -> int:
  args = _parse_args(argv)
  if _common.refuses_out("adapter_curve.py", args.out, args.overwrite):  # before any work
    return 2
  _common.start(args.smoke)
  results = [_run_side(args, side) for side in args.sides]
  steps = sorted({s for r in results for s, _ in r["curve"]})
  by_side = {r["side"]: dict(r["curve"]) for r in results}
  rows = [[s] + [by_side[r["side"]].get(s, "") for r in results] for s in steps]
  print(f"\nheld-out exact steering MAE, {args.dataset}, "
        f"{'tiny preset' if args.smoke else args.model}")
  print(_common.table(rows, ["step"] + [r["side"] for r in results]))
  for r in results:
    print(f"{r['side']}: {r['steps']} steps, final {r['final_steering_mae']}, wall "
          f"{r['wall_s']} s")
  marginal = marginal_mae(args.dataset)
  print(f"one distribution for every occupation (the targets' mean): {marginal:.4f}")
  doc = {"benchmark": "adapter_curve", "command": _common.command_line(),
         "machine": _common.machine_info(), "model": args.model or "tiny",
         "dataset": args.dataset, "marginal_mae": marginal, "sides": results}
  _common.write_json(args.out, doc, overwrite=True)
  if args.plot:
    name = os.path.basename(os.path.normpath(args.model)) if args.model else "tiny"
    _plot(results, args.plot, f"{name}, {args.dataset}: steering KL alone, same data and steps",
          marginal)
    print(f"figure: {args.plot}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
