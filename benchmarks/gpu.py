"""One-GPU figures: hybrid-step tokens/s and MFU, and sampler decode throughput vs the HBM roofline.

Hybrid step: ``distfair_jax.train.step`` (reference online, as in training) on the ``llama3.2-1b``
shape with random weights, bfloat16 parameters and compute, per-layer remat (``--remat``, default
``dots``), full fine-tuning with AdamW, on a synthetic hybrid batch of ``--batch`` x ``--length``
(targets) plus as many mismatched pairs. FLOPs per step come from ``distfair_jax.train.flops``
(6 forward passes' worth for the hybrid step with the reference online: 3 F targets with gradient
+ 1 F mismatched + 2 F reference, over padded tokens); MFU = achieved FLOP/s / the device's dense
bf16 peak (H200: 989 TFLOP/s). tokens/s counts the padded tokens of targets and mismatched pairs.
If the step does not fit in memory, the batch is halved and the step recompiled.

Decode: ``distfair_jax.evaluation.sample.Sampler.generate`` (KV cache, jit-compiled ``while_loop``) on
``--decode-batch`` random prompts of ``--prompt-length`` tokens, ``--new-tokens`` sampled tokens at
temperature 1 with no stop token (every row decodes every step). Decode time = generate's time minus
its prefill (timed by calling the sampler's compiled prefill with the same arguments). Roofline: a
decode step must read all parameters and the whole KV cache (``init_cache`` slots: the attention reads
every slot), so ``roofline step time = (param bytes + KV bytes) / HBM bandwidth`` (H200: 4.8 TB/s);
reported: achieved / roofline = roofline step time / measured step time.

  python benchmarks/gpu.py                # on one NVIDIA GPU; about 3-5 minutes including compiles
  python benchmarks/gpu.py --smoke        # micro model on any device (the CPU), seconds

JSON is written (atomically, after each part) to ``--out`` (default benchmarks/results/gpu.json, or
gpu_smoke.json with --smoke).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

# Dense bf16 peak is in distfair_jax.train.flops.PEAK_TFLOPS; HBM bandwidth (TB/s) per device kind.
HBM_TBPS = {"NVIDIA H200": 4.8, "NVIDIA H100": 3.35, "NVIDIA A100": 2.0}
MICRO = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             max_position_embeddings=512, tie_word_embeddings=True)
T0 = time.perf_counter()


def log(msg: str) -> None:
  print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def _parse(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", default="llama3.2-1b")
  p.add_argument("--batch", type=int, default=32, help="hybrid step: target sequences per step")
  p.add_argument("--length", type=int, default=1024, help="hybrid step: padded sequence length")
  p.add_argument("--remat", choices=("none", "full", "dots"), default="dots")
  p.add_argument("--tile-size", type=int, default=None, help="log-prob tile (default: the library's)")
  p.add_argument("--steps", type=int, default=5, help="timed hybrid steps (after 2 warm-up steps)")
  p.add_argument("--reference", choices=("online", "cached", "both"), default="online")
  p.add_argument("--layout", choices=("rows", "packed"), default="rows",
                 help="hybrid batch layout (rows: dense B x L tokens, the clean MFU measure; packed: "
                      "one row per pair, as training runs by default)")
  p.add_argument("--decode-batch", type=int, default=256)
  p.add_argument("--prompt-length", type=int, default=128)
  p.add_argument("--new-tokens", type=int, default=256)
  p.add_argument("--decode-runs", type=int, default=2, help="timed generate calls (after a warm-up)")
  p.add_argument("--skip-train", action="store_true")
  p.add_argument("--skip-decode", action="store_true")
  p.add_argument("--peak-tflops", type=float, default=None, help="override the device's bf16 peak")
  p.add_argument("--hbm-tbps", type=float, default=None, help="override the device's HBM TB/s")
  p.add_argument("--smoke", action="store_true", help="micro model and sizes; runs on the CPU")
  p.add_argument("--allow-cpu", action="store_true", help="full sizes without a GPU (slow)")
  p.add_argument("--out", default=None)
  p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
  args = p.parse_args(argv)
  if args.smoke:
    args.batch, args.length, args.steps = 4, 32, 2
    args.decode_batch, args.prompt_length, args.new_tokens, args.decode_runs = 4, 8, 8, 1
  for name in ("batch", "length", "steps", "decode_batch", "prompt_length", "new_tokens",
               "decode_runs"):
    if getattr(args, name) < 1:
      p.error(f"--{name.replace('_', '-')}: expected a positive int, got {getattr(args, name)}")
  if args.batch < 2 or args.batch % 2:
    p.error(f"--batch: expected an even number >= 2 (desirable/undesirable pairs), got {args.batch}")
  if args.new_tokens < 2:
    p.error("--new-tokens: expected >= 2 (one decode step at least)")
  if args.out is None:
    args.out = os.path.join(_common.RESULTS_DIR, "gpu_smoke.json" if args.smoke else "gpu.json")
  return args


def _config(args):
  from distfair_jax.model.llama import LlamaConfig
  from distfair_jax.model.presets import get_preset
  kw = dict(dtype="bfloat16", param_dtype="bfloat16", remat=args.remat)
  if args.smoke:
    return LlamaConfig(**MICRO, **kw)
  return get_preset(args.preset, **kw)


def _build_model(cfg, device):
  """Random weights created directly on ``device`` (jit-compiled initialiser)."""
  from flax import nnx
  from distfair_jax import sharding as shd
  from distfair_jax.model.llama import Llama
  mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=[device])
  return shd.create_sharded(lambda: Llama(cfg, rngs=nnx.Rngs(0)), mesh)


def _is_oom(err: BaseException) -> bool:
  text = str(err)
  return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


# ------------------------------------------------------------------------------------------------
# Hybrid step


def _train(args, cfg, device, reference: str) -> dict[str, Any]:
  from distfair_jax import losses
  tile = args.tile_size or losses.DEFAULT_TILE_SIZE
  batch_size = args.batch
  while True:
    h = None
    try:
      log(f"hybrid step ({reference} reference): building {batch_size} x {args.length}")
      h = _common.HybridStep(_build_model(cfg, device), (15, 16), reference=reference,
                             tile_size=tile, device=device)
      host = _common.hybrid_batch(cfg.vocab_size, batch_size, args.length, (15, 16), seed=0,
                                  layout=args.layout)
      dev = h.put(host)
      t0 = time.perf_counter()
      h.block(h.run(dev))
      compile_s = time.perf_counter() - t0
      log(f"compiled + first step in {compile_s:.1f}s")
      break
    except Exception as e:  # noqa: BLE001 - XlaRuntimeError has no stable import path
      del h
      if _is_oom(e) and batch_size > 2:
        log(f"out of memory at batch {batch_size}; halving")
        batch_size //= 2
        continue
      raise
  metrics = h.run(dev)
  h.block(metrics)
  times = []
  for i in range(args.steps):
    t0 = time.perf_counter()
    metrics = h.run(dev)
    h.block(metrics)
    times.append(time.perf_counter() - t0)
    log(f"step {i + 1}/{args.steps}: {times[-1] * 1e3:.1f} ms, loss {float(metrics['loss']):.4f}")
  step_s = statistics.median(times)
  flops = h.stage.flops(cfg, host)
  computed_tokens = (int(host.packed.input_ids.size) if args.layout == "packed"
                     else 2 * batch_size * args.length)  # what the device computes per pass
  tflops = flops / step_s / 1e12
  peak = args.peak_tflops or _peak(device)
  mem = {}
  try:
    stats = device.memory_stats() or {}
    mem = {k: stats[k] for k in ("peak_bytes_in_use", "bytes_limit") if k in stats}
  except Exception:  # noqa: BLE001 - not every backend reports memory
    pass
  out = {
      "reference": reference, "batch": batch_size, "length": args.length, "tile_size": tile,
      "remat": cfg.remat, "step_s": step_s, "step_s_runs": times,
      "compile_and_first_step_s": compile_s,
      "layout": args.layout, "tokens_per_step": computed_tokens,
      "tokens_per_s": computed_tokens / step_s,
      "examples_per_s": batch_size / step_s,
      "flops_per_step": flops, "tflops_per_s": tflops, "peak_tflops": peak,
      "mfu": (tflops / peak) if peak else None, "goal_mfu": 0.35,
      "loss": float(metrics["loss"]), "compiles": h.compiles(), "memory": mem,
  }
  mfu = f"{out['mfu'] * 100:.1f}%" if out["mfu"] is not None else "n/a (unknown peak)"
  log(f"hybrid step: {step_s * 1e3:.1f} ms, {out['tokens_per_s']:,.0f} tokens/s, "
      f"{tflops:.1f} TFLOP/s, MFU {mfu}")
  del h, dev
  return out


def _peak(device) -> float | None:
  from distfair_jax.train.flops import peak_tflops
  return peak_tflops(device)


def _hbm(device) -> float | None:
  kind = getattr(device, "device_kind", "")
  for name, tbps in HBM_TBPS.items():
    if kind.startswith(name):
      return tbps
  return None


# ------------------------------------------------------------------------------------------------
# Decode


def _decode(args, cfg, device) -> dict[str, Any]:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from distfair_jax.evaluation import sample
  from distfair_jax.config import DecodeConfig
  from distfair_jax.data.tokenize import prompt_bucket
  model = _build_model(cfg, device)
  sampler, state = sample.Sampler.of(model)
  rng = np.random.default_rng(0)
  b, n_new = args.decode_batch, args.new_tokens
  prompts = [rng.integers(32, cfg.vocab_size, size=args.prompt_length).tolist() for _ in range(b)]
  dcfg = DecodeConfig(max_new_tokens=n_new)
  kw = dict(rounds=1, config=dcfg, steering="none", stop_ids=(), pad_id=0, batch_size=b)
  log(f"decode: {b} rows, prompt {args.prompt_length}, {n_new} new tokens: compiling")
  t0 = time.perf_counter()
  sampler.generate(state, prompts, seed=1, **kw)
  compile_s = time.perf_counter() - t0
  log(f"decode: compiled + first call in {compile_s:.1f}s")

  # The sampler's own compiled prefill, called with generate's arguments (a cache hit, no compile).
  prefill_s = None
  length = prompt_bucket(args.prompt_length)  # generate's padded prompt length
  cache_length = length + n_new
  try:
    ids, mask = sample.left_pad(prompts, 0, length)
    args_p = (state, jnp.asarray(ids), jnp.asarray(mask))
    jax.block_until_ready(sampler.prefill(*args_p, rounds=1, cache_length=cache_length))
    pt = []
    for _ in range(3):
      t0 = time.perf_counter()
      jax.block_until_ready(sampler.prefill(*args_p, rounds=1, cache_length=cache_length))
      pt.append(time.perf_counter() - t0)
    prefill_s = statistics.median(pt)
  except Exception as e:  # noqa: BLE001 - private API may change; fall back to no subtraction
    log(f"decode: could not time the prefill separately ({type(e).__name__}: {e}); "
        "decode time includes it")
  totals = []
  for i in range(args.decode_runs):
    t0 = time.perf_counter()
    out = sampler.generate(state, prompts, seed=2 + i, **kw)
    totals.append(time.perf_counter() - t0)
  total_s = statistics.median(totals)
  steps = n_new - 1  # the first new token comes from the prefill logits
  decode_s = total_s - (prefill_s or 0.0)
  if decode_s <= 0.1 * total_s:  # timing noise at tiny sizes: do not subtract
    log(f"decode: prefill ({prefill_s:.4f}s) ~ generate ({total_s:.4f}s); not subtracted")
    decode_s, prefill_s = total_s, None
  step_s = decode_s / steps
  # Bytes one decode step reads: every parameter, and every KV-cache slot of every layer.
  param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  kv_bytes = (2 * cfg.num_hidden_layers * b * cache_length * cfg.num_key_value_heads * cfg.head_dim
              * jnp.dtype(cfg.compute_dtype).itemsize)
  hbm = args.hbm_tbps or _hbm(device)
  roofline_step_s = (param_bytes + kv_bytes) / (hbm * 1e12) if hbm else None
  res = {
      "rows": b, "prompt_length": args.prompt_length, "new_tokens": n_new,
      "cache_length": cache_length, "generated_tokens": int(np.asarray(out.num_tokens).sum()),
      "generate_s": total_s, "generate_s_runs": totals, "prefill_s": prefill_s,
      "decode_s": decode_s, "decode_steps": steps, "step_s": step_s,
      "decode_tokens_per_s": b * steps / decode_s,
      "end_to_end_tokens_per_s": b * n_new / total_s,
      "param_bytes": int(param_bytes), "kv_cache_bytes": int(kv_bytes),
      "bytes_per_step": int(param_bytes + kv_bytes),
      "achieved_tb_per_s": (param_bytes + kv_bytes) / step_s / 1e12,
      "hbm_tb_per_s": hbm, "roofline_step_s": roofline_step_s,
      "roofline_tokens_per_s": (b / roofline_step_s) if roofline_step_s else None,
      "achieved_over_roofline": (roofline_step_s / step_s) if roofline_step_s else None,
      "goal_fraction": 0.5, "compile_and_first_call_s": compile_s,
      "params": int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))),
  }
  frac = res["achieved_over_roofline"]
  log(f"decode: {step_s * 1e3:.2f} ms/step, {res['decode_tokens_per_s']:,.0f} tokens/s, "
      f"{res['achieved_tb_per_s']:.2f} TB/s read"
      + (f" = {frac * 100:.1f}% of the {hbm} TB/s roofline" if frac is not None else ""))
  return res


def main(argv=None) -> int:
  args = _parse(argv)
  _common.set_threads()
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
  if args.smoke:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    _common.fast_compile_flags()
  if not args.overwrite and os.path.exists(args.out):
    print(f"gpu.py: --out: {args.out} exists; pass --overwrite to replace it", file=sys.stderr)
    return 2
  import jax
  import warnings
  warnings.filterwarnings("ignore", message=".*donat.*")
  device = jax.devices()[0]
  if device.platform != "gpu" and not (args.smoke or args.allow_cpu):
    print(f"gpu.py: device: expected an NVIDIA GPU, got {device.platform} "
          f"({getattr(device, 'device_kind', '?')}); use --smoke on the CPU", file=sys.stderr)
    return 2
  cfg = _config(args)
  log(f"device {device.platform}: {getattr(device, 'device_kind', '?')}; model "
      f"{'micro (smoke)' if args.smoke else args.preset}, bf16, remat {cfg.remat}")
  results: dict[str, Any] = {"benchmark": "gpu", "command": _common.command_line(),
                             "machine": _common.machine_info(), "smoke": args.smoke,
                             "model": "micro" if args.smoke else args.preset,
                             "config": {k: v for k, v in cfg.to_hf().items()
                                        if k not in ("architectures", "rope_parameters")},
                             "dtype": "bfloat16", "train": [], "decode": None, "errors": []}

  def save():
    results["wall_s"] = time.perf_counter() - T0
    _common.write_json(args.out, results, overwrite=True)

  if not args.skip_train:
    refs = ("online", "cached") if args.reference == "both" else (args.reference,)
    for ref in refs:
      try:
        results["train"].append(_train(args, cfg, device, ref))
      except Exception as e:  # noqa: BLE001 - record and go on to the decode figures
        traceback.print_exc()
        results["errors"].append(f"train ({ref}): {type(e).__name__}: {str(e)[:2000]}")
      save()
  if not args.skip_decode:
    try:
      results["decode"] = _decode(args, cfg, device)
    except Exception as e:  # noqa: BLE001
      traceback.print_exc()
      results["errors"].append(f"decode: {type(e).__name__}: {str(e)[:2000]}")
    save()

  print()
  rows = [[t["reference"], f"{t['batch']}x{t['length']}", t["step_s"] * 1e3, t["tokens_per_s"],
           t["tflops_per_s"], "n/a" if t["mfu"] is None else f"{t['mfu'] * 100:.1f}%"]
          for t in results["train"]]
  if rows:
    print(f"Hybrid step ({results['model']}, bf16, remat {cfg.remat}; goal MFU >= 35%)")
    print(_common.table(rows, ["reference", "BxL", "ms/step", "tokens/s", "TFLOP/s", "MFU"]))
  d = results["decode"]
  if d:
    frac = d["achieved_over_roofline"]
    print(f"\nDecode (Sampler.generate; goal >= 50% of the HBM roofline)")
    print(_common.table([[d["rows"], d["cache_length"], d["step_s"] * 1e3, d["decode_tokens_per_s"],
                          d["achieved_tb_per_s"],
                          "n/a" if frac is None else f"{frac * 100:.1f}%"]],
                        ["rows", "cache slots", "ms/step", "tokens/s", "TB/s read", "of roofline"]))
  print(f"\ntotal wall {time.perf_counter() - T0:.1f}s; wrote {args.out}")
  return 1 if results["errors"] else 0


if __name__ == "__main__":
  sys.exit(main())
