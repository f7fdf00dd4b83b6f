"""Examples/s of one hybrid (KTO + steering KL) training step: ours (JAX) vs the PyTorch formulation.

Sides (same weights, same sequences):

- ours: ``distfair_jax.train.step`` compiled with ``jax.jit`` (state donated) on the packed layout
  (one row per pair: prompt once, then desirable, undesirable and the two mismatched completions):
  one policy pass, the reference pass inside the step, vocabulary-tiled log-probs at the label
  positions, the steering logits sliced before the output projection, AdamW (optax, clipping at 1.0).
- ours_cached: the same with reference log-probs that come with the batch (computed once up front;
  that pass is not timed).
- ours_rows: our step on the rows layout (the torch side's tensors): a policy pass over the targets
  with gradient, one over the mismatched pairs without, the reference over both.
- ours_pooled, ours_rows_pooled: what ``hybrid.reference: auto`` runs where the pool pays
  (``train.reference_cache``), on the packed and the rows layout:
  the step reading its reference log-probs from the batch, plus the reference pass over the step's
  sequences timed separately (side ``reference_pass``) and charged at the share of them that a
  stage of ``--epochs`` epochs has to compute (each distinct sequence once): synthetic, (1 + E) /
  (2 E) (random tokens: every target recurs once per epoch, every mismatched pair is new); real,
  the share measured by pooling a whole stage of gender_real_us pairs (48 rows per occupation).
  Examples/s per run: batch / (cached step time + share x reference pass time), the cached step
  being ours_cached (packed) or ours_rows_cached (rows).
- torch: the reference implementation's formulation with Hugging Face's ``LlamaForCausalLM`` on the
  same config and weights (copied from ours) and sequences: a policy forward on the targets for the
  steering KL; policy forwards on the targets (with gradient) and on the mismatched pairs (under
  ``no_grad``, as TRL does) for KTO; reference forwards on both under ``no_grad``; full float32
  ``log_softmax`` over the vocabulary; ``torch.optim.AdamW`` (clipping at 1.0). Its batch (and
  ours_rows') is padded to the longest sequence, as a PyTorch collator does.

Workloads (``--workloads``): ``real``, gender_real_us KTO pairs tokenized by the data pipeline with
the tiny tokenizer (the method's data: long prompt, short answers); ``synthetic``, random tokens with
completions ~3x the prompt (the case least favourable to packing).

Both run float32 on the same CPU cores (``set_threads``: JAX's Eigen pool and torch's MKL/OpenMP pool
sized to all cores), in one process, alternating (ours, ours cached, torch, ours, ...), with a pause
between runs so that idle OpenMP threads stop spinning. A run repeats steps for at least
``--min-run-s`` seconds; examples/s = batch x steps / time. Ratios are ours / torch per run, reported
as min / median / max over the runs, plus the ratio of the medians. As a correctness check, the first
step's loss (identical initial weights) is compared across the sides.

Scaling: step time of ours (rows layout, reference online) at three batch x length sizes, and a
least-squares fit time = a + b * tokens.

  python benchmarks/train_step.py                      # tiny + 50M, both workloads, scaling; ~15 min
  python benchmarks/train_step.py --sizes tiny --runs 3
  python benchmarks/train_step.py --smoke              # a micro model, seconds

Tables are printed; JSON is written (atomically) to ``--out`` (default
benchmarks/results/train_step.json, or train_step_smoke.json with --smoke).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

# name -> (LlamaConfig fields, batch, length)
SIZES: dict[str, tuple[dict[str, Any], int, int]] = {
    "tiny": ({"preset": "tiny"}, 8, 128),
    # ~56M parameters (untied output layer).
    "50m": (_common.MODEL_50M, 8, 128),
    # --smoke only.
    "micro": (dict(vocab_size=1536, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   max_position_embeddings=256, tie_word_embeddings=True), 4, 16),
}
STEERING_IDS = (3, 4)  # K = 2 steering tokens


def _parse(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--sizes", default="tiny,50m", help=f"comma-separated, of {', '.join(SIZES)}")
  p.add_argument("--workloads", default="real,synthetic",
                 help="comma-separated: real (gender_real_us KTO pairs: short answers), synthetic "
                      "(random tokens, completions ~3x the prompt)")
  p.add_argument("--batch", type=int, default=None, help="override every size's batch")
  p.add_argument("--length", type=int, default=None, help="override every size's length")
  p.add_argument("--runs", type=int, default=7, help="alternating timed runs per side")
  p.add_argument("--min-run-s", type=float, default=1.0, help="each run repeats steps this long")
  p.add_argument("--pause-s", type=float, default=0.3, help="idle pause between runs")
  p.add_argument("--epochs", type=int, default=3,
                 help="ours_rows_pooled: the stage's epochs (hybrid.epochs; default 3)")
  p.add_argument("--tile-size", type=int, default=None,
                 help="ours: positions per log-prob tile (default: losses.DEFAULT_TILE_SIZE)")
  p.add_argument("--scaling-size", default="50m", help="size used for the scaling table")
  p.add_argument("--scaling", default="8x64,8x128,16x128",
                 help="batch x length points of the scaling table ('' to skip)")
  p.add_argument("--threads", type=int, default=None, help="cores for both sides (default: all)")
  p.add_argument("--smoke", action="store_true", help="micro model, 2 runs, tiny scaling table")
  p.add_argument("--out", default=None)
  p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
  args = p.parse_args(argv)
  if args.smoke:
    args.sizes, args.runs, args.min_run_s, args.pause_s = "micro", 2, 0.0, 0.0
    args.scaling_size, args.scaling = "micro", "4x16,4x32"
  args.size_names = [s.strip() for s in args.sizes.split(",") if s.strip()]
  args.workload_names = [w.strip() for w in args.workloads.split(",") if w.strip()]
  if not args.workload_names or set(args.workload_names) - {"real", "synthetic"}:
    p.error(f"--workloads: expected real and/or synthetic, got {args.workloads!r}")
  for s in args.size_names + ([args.scaling_size] if args.scaling else []):
    if s not in SIZES:
      p.error(f"--sizes: expected names among {', '.join(SIZES)}, got {s!r}")
  try:
    args.scaling_points = [tuple(int(v) for v in pt.lower().split("x"))
                           for pt in args.scaling.split(",") if pt.strip()]
    assert all(len(pt) == 2 and pt[0] >= 2 and pt[0] % 2 == 0 and pt[1] >= 8
               for pt in args.scaling_points)
  except (ValueError, AssertionError):
    p.error(f"--scaling: expected BxL points like 8x64,8x128 (even B >= 2, L >= 8), "
            f"got {args.scaling!r}")
  if args.runs < 1:
    p.error(f"--runs: expected a positive int, got {args.runs}")
  if args.out is None:
    args.out = os.path.join(_common.RESULTS_DIR,
                            "train_step_smoke.json" if args.smoke else "train_step.json")
  return args


# ------------------------------------------------------------------------------------------------
# Models


def _config(name: str):
  from distfair_jax.model.llama import LlamaConfig
  from distfair_jax.model.presets import get_preset
  fields = dict(SIZES[name][0])
  if "preset" in fields:
    return get_preset(fields.pop("preset"), **fields)
  return LlamaConfig(**fields)


def _jax_model(cfg, seed: int):
  from flax import nnx
  from distfair_jax.model.llama import Llama
  return Llama(cfg, rngs=nnx.Rngs(seed))


def _torch_model(cfg, jax_model):
  """transformers' LlamaForCausalLM with our model's weights (kernels transposed to HF layout)."""
  import numpy as np
  import torch
  import transformers
  from flax import nnx
  from distfair_jax.convert.hf import hf_name
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg.to_hf())).float()
  sd = {}
  for path, var in nnx.to_flat_state(nnx.state(jax_model, nnx.Param)):
    name, transposed = hf_name(tuple(path))
    value = np.asarray(var.get_value() if hasattr(var, "get_value") else var.value, np.float32)
    sd[name] = torch.from_numpy(np.ascontiguousarray(value.T if transposed else value))
  missing, unexpected = model.load_state_dict(sd, strict=False)
  missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
  if missing or unexpected:
    raise RuntimeError(f"weight copy: missing {missing}, unexpected {unexpected}")
  if cfg.tie_word_embeddings:
    model.tie_weights()
  return model


# ------------------------------------------------------------------------------------------------
# The PyTorch formulation


class TorchHybrid:
  """One hybrid step in the reference implementation's formulation (see the module docstring)."""

  def __init__(self, model, batch: dict[str, Any], steering_ids, beta: float = 0.1,
               learning_rate: float = 1e-5):
    import copy
    import torch
    self.torch = torch
    self.policy = model
    self.policy.train()
    self.reference = copy.deepcopy(model).eval()
    for p in self.reference.parameters():
      p.requires_grad_(False)
    self.opt = torch.optim.AdamW(self.policy.parameters(), lr=learning_rate, betas=(0.9, 0.999),
                                 eps=1e-8, weight_decay=0.01)
    self.b = {k: torch.from_numpy(v) for k, v in _common.torch_arrays(batch).items()}
    for k in ("input_ids", "attention_mask", "labels", "kl_input_ids", "kl_attention_mask",
              "kl_labels", "steering_position"):
      self.b[k] = self.b[k].long()
    self.steering_ids = torch.tensor(steering_ids, dtype=torch.long)
    self.beta = beta

  def _logps(self, logits, labels, mask):
    """Full float32 log_softmax over the vocabulary, gathered at the labels: [B, L, V] -> [B]."""
    torch = self.torch
    logp = torch.log_softmax(logits.float(), dim=-1)
    tok = torch.gather(logp, 2, (labels * (mask > 0)).unsqueeze(2)).squeeze(2)
    return (tok * mask).sum(-1)

  def step(self) -> float:
    torch, b = self.torch, self.b
    n = b["input_ids"].shape[0]
    self.opt.zero_grad(set_to_none=True)
    # Steering KL: policy forward on the targets, full-vocabulary log-softmax at the steering position.
    logits = self.policy(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    steer = logits[torch.arange(n), b["steering_position"]].float()
    log_q = torch.log_softmax(steer, dim=-1)[:, self.steering_ids]
    p = b["target"]
    log_p = torch.log(torch.where(p > 0, p, torch.ones_like(p)))
    kl = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)
    w = b["desirable"].float()
    steer_kl = (w * kl).sum() / w.sum()
    # KTO: policy on the targets (with gradient) and on the mismatched pairs (no_grad, as TRL).
    logps = self._logps(self.policy(input_ids=b["input_ids"],
                                    attention_mask=b["attention_mask"]).logits,
                        b["labels"], b["label_mask"])
    with torch.no_grad():
      kl_logps = self._logps(self.policy(input_ids=b["kl_input_ids"],
                                         attention_mask=b["kl_attention_mask"]).logits,
                             b["kl_labels"], b["kl_label_mask"])
      ref_logps = self._logps(self.reference(input_ids=b["input_ids"],
                                             attention_mask=b["attention_mask"]).logits,
                              b["labels"], b["label_mask"])
      ref_kl_logps = self._logps(self.reference(input_ids=b["kl_input_ids"],
                                                attention_mask=b["kl_attention_mask"]).logits,
                                 b["kl_labels"], b["kl_label_mask"])
    z0 = (kl_logps - ref_kl_logps).mean().clamp(min=0).detach()
    r = logps - ref_logps
    good = b["desirable"] > 0
    kto = torch.where(good, 1 - torch.sigmoid(self.beta * (r - z0)),
                      1 - torch.sigmoid(self.beta * (z0 - r))).mean()
    loss = kto + steer_kl
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.policy.parameters(), 1.0)
    self.opt.step()
    return float(loss.detach())


# ------------------------------------------------------------------------------------------------
# Timing


def _timed_run(step_once, min_s: float) -> tuple[float, int]:
  """Repeats ``step_once()`` (which must block) for at least ``min_s`` -> (seconds, steps)."""
  steps = 0
  t0 = time.perf_counter()
  while True:
    step_once()
    steps += 1
    elapsed = time.perf_counter() - t0
    if elapsed >= min_s:
      return elapsed, steps


SIDES = ("ours", "ours_cached", "ours_pooled", "ours_rows", "ours_rows_pooled", "torch")


def _pooled_share(workload: str, batch_size: int, epochs: int) -> float:
  """The share of a stage's reference sequences that the pooled cache computes (see the docstring)."""
  if workload == "synthetic":
    return (1 + epochs) / (2 * epochs)
  from distfair_jax.data import build, pipeline, tokenize
  from distfair_jax.data.tokenizer import build_tiny_tokenizer
  from distfair_jax.train.reference_cache import SequencePool
  ds = build.build_dataset("gender_real_us", rows_per_occupation=48, test_rounds=1, seed=0)
  encoder = tokenize.Encoder(build_tiny_tokenizer(), attribute=ds.spec.attribute)
  pipe = pipeline.make_batches(ds["kto"], encoder, "kto", batch_size, seed=0, num_epochs=epochs,
                               layout="rows", shard_index=0, shard_count=1)
  return SequencePool.from_batches(enumerate(pipe)).distinct_share


def _workload(name: str, cfg, batch_size: int, length: int):
  """-> (packed batch, rows batch cut to its longest sequence, steering ids, description)."""
  if name == "real":
    rows, packed, steering, vocab = _common.real_kto_batch(batch_size)
    if vocab > cfg.vocab_size:
      raise SystemExit(f"real workload: the tiny tokenizer's {vocab} tokens exceed the model's "
                       f"vocabulary {cfg.vocab_size}")
    what = "gender_real_us KTO pairs, tiny tokenizer"
  else:
    packed = _common.hybrid_batch(cfg.vocab_size, batch_size, length, STEERING_IDS, seed=1,
                                  layout="packed")
    rows = _common.hybrid_batch(cfg.vocab_size, batch_size, length, STEERING_IDS, seed=1)
    steering, what = list(STEERING_IDS), "random tokens, completions ~3x the prompt"
  return packed, _common.trim_rows(rows), steering, what


def _bench_size(name: str, workload: str, args, keep: dict[str, Any]) -> dict[str, Any]:
  import jax
  from distfair_jax import losses

  cfg = _config(name)
  batch_size = args.batch or SIZES[name][1]
  length = args.length or SIZES[name][2]
  tile = args.tile_size or losses.DEFAULT_TILE_SIZE
  packed, rows, steering, what = _workload(workload, cfg, batch_size, length)
  jmodel = _jax_model(cfg, seed=0)
  tmodel = _torch_model(cfg, jmodel)
  n_params = sum(p.numel() for p in tmodel.parameters())
  seq_tokens = int(rows.seq.attention_mask.sum() + rows.mismatched.attention_mask.sum())
  packed_tokens = int((packed.packed.segment_ids > 0).sum())
  print(f"\n== {name} / {workload} ({what}): {n_params / 1e6:.1f}M parameters, batch {batch_size} "
        f"sequences + {batch_size} mismatched; rows {tuple(rows.seq.input_ids.shape)} "
        f"({seq_tokens} tokens), packed {tuple(packed.packed.input_ids.shape)} "
        f"({packed_tokens} tokens); tile {tile}", flush=True)

  t0 = time.perf_counter()
  steps = {
      "ours": (_common.HybridStep(jmodel, steering, reference="online", tile_size=tile), packed),
      "ours_cached": (_common.HybridStep(_jax_model(cfg, seed=0), steering, reference="cached",
                                         tile_size=tile), packed),
      "ours_rows": (_common.HybridStep(_jax_model(cfg, seed=0), steering, reference="online",
                                       tile_size=tile), rows),
      "ours_rows_cached": (_common.HybridStep(_jax_model(cfg, seed=0), steering,
                                              reference="cached", tile_size=tile), rows),
  }
  device_batches = {k: h.put(b) for k, (h, b) in steps.items()}
  share = _pooled_share(workload, batch_size, args.epochs)
  ref_side = steps["ours_rows_cached"][0]
  ref_batch = device_batches["ours_rows"]
  first = {}
  for key, (h, _) in steps.items():
    m = h.run(device_batches[key])
    h.block(m)
    first[key] = float(m["loss"])
  compile_s = time.perf_counter() - t0
  torch_side = TorchHybrid(tmodel, rows, steering)
  first["torch"] = torch_side.step()
  print("first-step loss: " + "  ".join(f"{k} {v:.6f}" for k, v in first.items()) +
        f"  (compile + first steps of ours: {compile_s:.1f}s)", flush=True)

  def ours_once(h, b):
    def f():
      h.block(h.run(b))
    return f

  def reference_once():  # the reference over the step's targets + mismatched pairs (2B rows)
    import jax
    jax.block_until_ready(ref_side.reference_fn(ref_side.ref_params, ref_side.rngs,
                                                ref_side.frozen, ref_batch))

  runners = {k: ours_once(h, device_batches[k]) for k, (h, _) in steps.items()}
  runners["reference_pass"] = reference_once
  runners["torch"] = torch_side.step
  for key, fn in runners.items():  # one untimed warm-up step each (allocator, caches)
    fn()
  times = {k: [] for k in runners}
  for i in range(args.runs):
    for key, fn in runners.items():
      time.sleep(args.pause_s)
      secs, n = _timed_run(fn, args.min_run_s)
      times[key].append(batch_size * n / secs)
    # pooled: the cached step plus the share of reference passes a pooled stage computes.
    ref_s = batch_size / times["reference_pass"][-1]
    for pooled, cached in (("ours_pooled", "ours_cached"), ("ours_rows_pooled", "ours_rows_cached")):
      step_s = batch_size / times[cached][-1]
      times.setdefault(pooled, []).append(batch_size / (step_s + share * ref_s))
    print(f"run {i + 1}/{args.runs}: " + "  ".join(f"{k} {v[-1]:.2f} ex/s" for k, v in times.items())
          + f"  (load {os.getloadavg()[0]:.1f})", flush=True)

  def ratio(key):
    per_run = [o / t for o, t in zip(times[key], times["torch"])]
    out = _common.spread(per_run)
    out["of_medians"] = statistics.median(times[key]) / statistics.median(times["torch"])
    out["per_run"] = per_run
    return out

  sides = {k: {"examples_per_s": _common.spread(v), "per_run": v} for k, v in times.items()}
  if workload == "synthetic":
    keep[name] = steps["ours_rows"][0]  # reused by the scaling table (same rows program)
  return {
      "name": name, "workload": workload, "workload_description": what, "params": int(n_params),
      "batch": batch_size, "rows_shape": list(rows.seq.input_ids.shape),
      "packed_shape": list(packed.packed.input_ids.shape), "sequence_tokens": seq_tokens,
      "packed_tokens": packed_tokens, "tile_size": tile,
      "config": {k: v for k, v in cfg.to_hf().items()
                 if k not in ("architectures", "rope_parameters")},
      **sides,
      "ratio": ratio("ours"), "ratio_cached": ratio("ours_cached"), "ratio_rows": ratio("ours_rows"),
      "ratio_pooled": ratio("ours_pooled"), "ratio_rows_pooled": ratio("ours_rows_pooled"),
      "pooled_share": share,
      "pooled_epochs": args.epochs,
      "first_step_loss": first,
      "loss_abs_diff": {k: abs(first[k] - first["torch"]) for k in steps},
      "compiles": {k: h.compiles() for k, (h, _) in steps.items()},
      "first_steps_incl_compile_s": compile_s,
      "jax_params_counted": int(sum(x.size for x in
                                    jax.tree.leaves(steps["ours"][0].state.params))),
  }


def _scaling(args, keep: dict[str, Any]) -> list[dict[str, Any]]:
  import numpy as np
  from distfair_jax import losses
  cfg = _config(args.scaling_size)
  tile = args.tile_size or losses.DEFAULT_TILE_SIZE
  rows = []
  print(f"\n== scaling ({args.scaling_size}, ours, rows layout, reference online)", flush=True)
  h = keep.get(args.scaling_size)
  if h is None or h.stage.tile_size != tile:
    h = _common.HybridStep(_jax_model(cfg, seed=0), STEERING_IDS, tile_size=tile)
  # The rows layout at fixed B x L (its tokens are exactly 2 x B x L): the cost per token.
  for b, l in args.scaling_points:
    dev = h.put(_common.hybrid_batch(cfg.vocab_size, b, l, STEERING_IDS, seed=2))
    h.block(h.run(dev))
    h.block(h.run(dev))
    per = []
    for _ in range(max(2, args.runs // 2)):
      time.sleep(args.pause_s)
      secs, steps = _timed_run(lambda: h.block(h.run(dev)), args.min_run_s)
      per.append(secs / steps)
    step_s = statistics.median(per)
    tokens = 2 * b * l  # targets + mismatched pairs (padded)
    rows.append({"batch": b, "length": l, "tokens": tokens, "step_s": step_s,
                 "us_per_token": 1e6 * step_s / tokens, "runs_s": per})
    print(f"{b}x{l}: {step_s * 1e3:.1f} ms/step, {1e6 * step_s / tokens:.1f} us/token", flush=True)
  rows_compiles = h.compiles()
  if len(rows) >= 2:
    x = np.array([r["tokens"] for r in rows], float)
    y = np.array([r["step_s"] for r in rows], float)
    slope, intercept = np.polyfit(x, y, 1)
    pred = slope * x + intercept
    r2 = 1 - float(np.sum((y - pred) ** 2) / max(np.sum((y - y.mean()) ** 2), 1e-30))
    for r in rows:
      r["fit_step_s"] = float(slope * r["tokens"] + intercept)
    rows.append({"fit": {"seconds_per_token": float(slope), "intercept_s": float(intercept),
                         "r2": r2}, "compiles": rows_compiles})
  return rows


def main(argv=None) -> int:
  args = _parse(argv)
  cores = _common.set_threads(args.threads)
  if args.smoke:
    _common.fast_compile_flags()
  import jax
  import torch
  torch.set_num_threads(cores)
  jax.config.update("jax_platforms", "cpu")
  import warnings
  warnings.filterwarnings("ignore", message=".*donat.*")
  torch.manual_seed(0)

  results = {"benchmark": "train_step", "command": _common.command_line(),
             "machine_before": _common.machine_info(), "goal_ratio": 2.0, "sizes": []}
  keep: dict[str, Any] = {}
  for name in args.size_names:
    for workload in args.workload_names:
      results["sizes"].append(_bench_size(name, workload, args, keep))
  results["scaling"] = _scaling(args, keep) if args.scaling_points else []
  results["machine_after"] = _common.machine_info()

  print("\nExamples/s of one hybrid step (float32, same CPU, "
        f"{cores} threads each; min / median / max over {args.runs} alternating runs)")
  rows = []
  for s in results["sizes"]:
    for key in ("ours", "ours_cached", "ours_pooled", "ours_rows", "ours_rows_cached",
                "ours_rows_pooled", "reference_pass", "torch"):
      e = s[key]["examples_per_s"]
      shape = s["packed_shape"] if key in ("ours", "ours_cached", "ours_pooled") else s["rows_shape"]
      rows.append([s["name"], f"{s['params'] / 1e6:.1f}M", s["workload"], key,
                   "x".join(map(str, shape)), e["min"], e["median"], e["max"]])
  print(_common.table(rows, ["size", "params", "data", "side", "arrays", "min", "median", "max"]))
  print("\nRatio ours / torch per run (goal >= 2.0); packed: what hybrid.layout auto picks for short "
        "answers; rows: the torch formulation's layout (auto's pick for long completions)")
  rows = []
  for s in results["sizes"]:
    for key, label in (("ratio", "packed, reference online"),
                       ("ratio_cached", "packed, reference from the batch (not timed)"),
                       ("ratio_pooled", "packed, pooled reference"),
                       ("ratio_rows", "rows, reference online"),
                       ("ratio_rows_pooled", "rows, pooled reference")):
      r = s[key]
      rows.append([s["name"], s["workload"], label, r["min"], r["median"], r["max"],
                   r["of_medians"]])
  print(_common.table(rows, ["size", "data", "ours", "min", "median", "max", "ratio of medians"]))
  if results["scaling"]:
    print(f"\nScaling of ours ({args.scaling_size}, rows layout, reference online); "
          f"tokens = 2 x B x L")
    pts = [r for r in results["scaling"] if "tokens" in r]
    print(_common.table([[f"{r['batch']}x{r['length']}", r["tokens"], r["step_s"] * 1e3,
                          r.get("fit_step_s", float("nan")) * 1e3, r["us_per_token"]] for r in pts],
                        ["BxL", "tokens", "ms/step", "fit ms/step", "us/token"]))
    fit = [r["fit"] for r in results["scaling"] if "fit" in r]
    if fit:
      print(f"fit: {fit[0]['seconds_per_token'] * 1e6:.2f} us/token + "
            f"{fit[0]['intercept_s'] * 1e3:.1f} ms, r2 {fit[0]['r2']:.4f}")
  print(f"\nload average before {results['machine_before'].get('load_average')}, "
        f"after {results['machine_after'].get('load_average')}")
  _common.write_json(args.out, results, overwrite=args.overwrite)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
