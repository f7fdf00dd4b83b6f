"""Memory and time of tiled vs naive per-token log-probs (forward + backward), side by side.

Compares `distfair_jax.losses.token_logps_from_hidden` (token tiles, custom VJP) with the naive
version that materialises the ``[batch, length, vocab]`` float32 logits
(``token_logps(hidden @ unembedding, ...)``), for the gradient of ``sum(g * logps)`` with respect to
the hidden states and the unembedding (``--grads hidden`` for a frozen output layer, as with LoRA).

Memory: XLA's compiled temporary buffer size, ``jax.jit(f).lower(...).compile().memory_analysis()``.
Time: median wall time (and process CPU time) of ``--runs`` calls after one warm-up call; the
calls of the variants alternate, so a change in the machine's load affects them alike.

  python benchmarks/logps_memory.py              # vocab 128256, hidden 2048, length 512, batch 2
  python benchmarks/logps_memory.py --tile-size 32,64,128   # sweep tile sizes
  python benchmarks/logps_memory.py --smoke     # small sizes, seconds

Results: printed as a table and written (atomically) as JSON to ``--out``
(default benchmarks/results/logps_memory.json, or logps_memory_smoke.json with --smoke).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from distfair_jax import losses

_RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--vocab", type=int, default=128256)
  p.add_argument("--hidden", type=int, default=2048)
  p.add_argument("--length", type=int, default=512)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--tile-size", type=str, default=str(losses.DEFAULT_TILE_SIZE),
                 help="positions per tile; a comma-separated list sweeps several "
                      f"(default {losses.DEFAULT_TILE_SIZE})")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                 help="dtype of hidden states and unembedding (log-probs are float32 either way)")
  p.add_argument("--grads", choices=("both", "hidden"), default="both",
                 help="differentiate w.r.t. hidden and unembedding, or hidden only (frozen head)")
  p.add_argument("--runs", type=int, default=3, help="timed calls per variant (after a warm-up)")
  p.add_argument("--no-time", action="store_true", help="memory only (compile, do not run)")
  p.add_argument("--smoke", action="store_true",
                 help="small sizes (vocab 4096, hidden 256, length 100, batch 2, tile 16)")
  p.add_argument("--out", type=str, default=None, help="JSON output path")
  p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
  args = p.parse_args(argv)
  if args.smoke:
    args.vocab, args.hidden, args.length, args.batch = 4096, 256, 100, 2
    if args.tile_size == str(losses.DEFAULT_TILE_SIZE):
      args.tile_size = "16"
  try:
    args.tile_sizes = [int(t) for t in args.tile_size.split(",") if t.strip()]
  except ValueError:
    p.error(f"--tile-size: expected positive ints separated by commas, got {args.tile_size!r}")
  if not args.tile_sizes or min(args.tile_sizes) < 1:
    p.error(f"--tile-size: expected positive ints, got {args.tile_size!r}")
  for name in ("vocab", "hidden", "length", "batch", "runs"):
    if getattr(args, name) < 1:
      p.error(f"--{name}: expected a positive int, got {getattr(args, name)}")
  if args.out is None:
    args.out = os.path.join(_RESULTS_DIR,
                            "logps_memory_smoke.json" if args.smoke else "logps_memory.json")
  return args


def _make_loss(logps_fn: Callable[..., jax.Array], grads: str) -> Callable[..., Any]:
  def loss(hidden, unembedding, labels, mask, g):
    return jnp.sum(g * logps_fn(hidden, unembedding, labels, mask))
  argnums = (0, 1) if grads == "both" else 0
  return jax.jit(jax.value_and_grad(loss, argnums=argnums))


def _naive(hidden, unembedding, labels, mask):
  logits = jnp.einsum("bld,dv->blv", hidden, unembedding, preferred_element_type=jnp.float32)
  return losses.token_logps(logits, labels, mask)


def _compile(name: str, fn: Callable[..., Any], inputs: tuple) -> tuple[Any, dict[str, Any]]:
  t0 = time.perf_counter()
  compiled = fn.lower(*inputs).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  row: dict[str, Any] = {
      "name": name,
      "temp_bytes": int(mem.temp_size_in_bytes),
      "argument_bytes": int(mem.argument_size_in_bytes),
      "output_bytes": int(mem.output_size_in_bytes),
      "alias_bytes": int(mem.alias_size_in_bytes),
      "compile_s": compile_s,
  }
  print(f"  compiled {name}: temp {row['temp_bytes'] / 2**20:.1f} MiB", flush=True)
  return compiled, row


def _time_round_robin(variants: list[tuple[Any, dict[str, Any]]], inputs: tuple,
                      runs: int) -> None:
  """Median wall time of each variant; the calls alternate between variants (after one warm-up
  call each) so that a change in the machine's load affects all of them alike."""
  for compiled, _ in variants:
    jax.block_until_ready(compiled(*inputs))
  times: list[list[float]] = [[] for _ in variants]
  cpu_times: list[list[float]] = [[] for _ in variants]
  for i in range(runs):
    for (compiled, row), out, cpu in zip(variants, times, cpu_times):
      c0, t0 = time.process_time(), time.perf_counter()
      jax.block_until_ready(compiled(*inputs))
      out.append(time.perf_counter() - t0)
      cpu.append(time.process_time() - c0)
      print(f"  run {i + 1}/{runs} {row['name']}: {out[-1]:.3f} s wall, {cpu[-1]:.3f} s CPU",
            flush=True)
  for (_, row), out, cpu in zip(variants, times, cpu_times):
    row["times_s"], row["cpu_times_s"] = out, cpu
    row["median_s"], row["median_cpu_s"] = statistics.median(out), statistics.median(cpu)


def _write_json(path: str, payload: dict[str, Any], overwrite: bool) -> None:
  if os.path.exists(path) and not overwrite:
    raise SystemExit(f"logps_memory.py: --out: {path} exists; pass --overwrite to replace it")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".logps_memory.", suffix=".tmp",
                             dir=os.path.dirname(os.path.abspath(path)))
  try:
    os.chmod(tmp, 0o644)  # mkstemp creates 0600
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      json.dump(payload, f, indent=2)
      f.write("\n")
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def main(argv: list[str] | None = None) -> int:
  args = _parse_args(argv)
  if os.path.exists(args.out) and not args.overwrite:  # fail before minutes of work
    print(f"logps_memory.py: --out: {args.out} exists; pass --overwrite to replace it",
          file=sys.stderr)
    return 2
  dtype = jnp.dtype(args.dtype)
  rng = np.random.default_rng(0)
  b, l, d, v = args.batch, args.length, args.hidden, args.vocab
  hidden = jnp.asarray(rng.standard_normal((b, l, d), np.float32), dtype)
  unembedding = jnp.asarray(rng.standard_normal((d, v), np.float32) / np.sqrt(d), dtype)
  labels = jnp.asarray(rng.integers(0, v, (b, l)), jnp.int32)
  mask = jnp.ones((b, l), jnp.float32)
  g = jnp.asarray(rng.standard_normal((b, l), np.float32))
  inputs = (hidden, unembedding, labels, mask, g)
  timed = not args.no_time

  print(f"logps fwd+bwd (grads: {args.grads}), batch {b}, length {l}, hidden {d}, vocab {v}, "
        f"{args.dtype}; backend {jax.default_backend()}, {os.cpu_count()} CPUs", flush=True)
  variants = [_compile("naive", _make_loss(_naive, args.grads), inputs)]
  for tile in args.tile_sizes:
    fn = _make_loss(lambda h, w, y, m, t=tile: losses.token_logps_from_hidden(h, w, y, m, t),
                    args.grads)
    variants.append(_compile(f"tiled (tile {tile})", fn, inputs))
    variants[-1][1]["tile_size"] = tile
  if timed:
    _time_round_robin(variants, inputs, args.runs)
  naive, rows = variants[0][1], [row for _, row in variants[1:]]
  for row in rows:
    row["temp_ratio"] = row["temp_bytes"] / max(naive["temp_bytes"], 1)
    if timed:
      row["time_ratio"] = row["median_s"] / naive["median_s"]
      row["cpu_time_ratio"] = row["median_cpu_s"] / naive["median_cpu_s"]

  header = f"| {'variant':<16} | {'temp MiB':>10} | {'temp / naive':>12} |"
  rule = f"|{'-' * 18}|{'-' * 12}|{'-' * 14}|"
  if timed:
    header += (f" {'median s':>9} | {'time / naive':>12} | {'median CPU s':>12} |"
               f" {'CPU / naive':>11} |")
    rule += f"{'-' * 11}|{'-' * 14}|{'-' * 14}|{'-' * 13}|"
  print()
  print(header)
  print(rule)
  for row in [naive] + rows:
    line = (f"| {row['name']:<16} | {row['temp_bytes'] / 2**20:>10.1f} | "
            f"{row.get('temp_ratio', 1.0):>12.3f} |")
    if timed:
      line += (f" {row['median_s']:>9.3f} | {row.get('time_ratio', 1.0):>12.3f} |"
               f" {row['median_cpu_s']:>12.3f} | {row.get('cpu_time_ratio', 1.0):>11.3f} |")
    print(line)
  print("goal: temp / naive <= 0.25" + (" and time / naive <= 1.3" if timed else ""))
  if timed:
    print(f"(CPU s = process CPU time, less sensitive than wall time to other load on the "
          f"machine; load average now {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs)")

  payload = {
      "benchmark": "logps_memory",
      "config": {"batch": b, "length": l, "hidden": d, "vocab": v, "dtype": args.dtype,
                 "grads": args.grads, "runs": args.runs, "smoke": args.smoke},
      "environment": {"jax": jax.__version__, "backend": jax.default_backend(),
                      "cpus": os.cpu_count(), "platform": platform.platform(),
                      "load_average_at_end": list(os.getloadavg())},
      "naive": naive,
      "tiled": rows,
  }
  _write_json(args.out, payload, args.overwrite)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
