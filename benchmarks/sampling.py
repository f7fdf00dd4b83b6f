"""Evaluation throughput (samples/s, tokens/s): our batched KV-cached sampler vs Hugging Face.

Workload: the v2 test set of ``gender_real_us`` (its first ``--prompts`` occupations, all 14 by
default, x ``--rounds`` samples), with model steering: the steering digit drawn from the softmax over
the digit logits at the first assistant position, written as the first assistant token, then
``--max-new-tokens`` tokens sampled at temperature 1 (no top-k / top-p), decoded to text. Equal
work on every side: by default no side stops early (ours without stop ids, Hugging Face with
``min_new_tokens = max_new_tokens``), so every sample has exactly ``--max-new-tokens`` new tokens;
``--stop-at-eos`` stops at end of turn on every side instead (mean new tokens reported per side).

Sides (``--sides``, all by default), in the same process, float32, on the same cores:

- ``ours``: ``distfair_jax.evaluation.sample.Sampler.generate`` with its default, shared-prefix decoding (each
  distinct prompt prefilled once and its cache kept once; the rounds' queries attend to it in one
  batched matmul, their new tokens in a small per-row cache; one jit-compiled program per chunk of
  prompts, a ``while_loop`` decode). Timed after one warm-up call (compile time reported).
- ``ours_plain``: the same sampler with ``shared_prefix=False`` (the prompt cache rows repeated
  ``rounds`` times).
- ``hf_batched``: what a careful user does with transformers: per prompt, one forward pass for the
  digit logits, all ``rounds`` digits drawn from them at once, then ONE ``model.generate(do_sample=
  True)`` call on the ``rounds`` prompt + digit rows (KV cache, same decoding settings), decoded.
- ``hf_single``: the original implementation's formulation: the same, one sample at a time. Slow,
  so it runs ``--torch-rounds`` rounds per prompt and its per-sample rate stands for the workload
  (said so in the output). It is timed at each thread count in ``--torch-threads`` (the fastest
  counts: on a busy machine one thread can beat two for a tiny model).

Torch runs with ``OMP_WAIT_POLICY=PASSIVE`` and as many threads as cores (``_common.set_threads``),
JAX on XLA's pool over the same cores. Timings on a shared machine are noisy, so ``--runs`` rounds
of measurements ALTERNATE the sides (ours, ours_plain, hf_batched, hf_single, then again): a burst of
load from elsewhere hits all. Each side reports min / median / max samples/s and tokens/s (new
tokens, the steering digit not counted); the speed-ups are ratios of medians, with the range of the
per-run ratios. The machine's load average is recorded before and after.

Arithmetic efficiency: a float32 2048 x 2048 @ 2048 x 2048 matmul in JAX (best of 5, timed before
and after the runs; the better counts) gives the CPU's measured peak FLOP/s; a new token costs ~2 x
(matmul parameters) FLOPs plus attention (4 x layers x heads x head_dim x attended positions); each
side's tokens/s times that, over the peak, is its fraction of the peak (end to end: prefill and
sampling included in the time, not in the FLOPs).

Models: ``--preset tiny`` (1M, the built-in tiny tokenizer), ``--preset 50m`` (the 56M model of
``train_step.py``, ``_common.MODEL_50M``, tiny tokenizer), both with random weights built in JAX
and written with ``distfair_jax.convert.hf`` for transformers; or ``--checkpoint DIR``, a converted
distfair directory (``distfair convert gguf-to-flax`` / ``hf-to-flax``, its tokenizer inside; e.g.
SmolLM2-135M-Instruct), converted for transformers with ``distfair_jax.convert.hf.flax_to_hf`` into a
temporary directory; when DIR does not exist the benchmark says so and exits without measuring.

  python benchmarks/sampling.py                        # tiny, 14 x 100, 16 new tokens, 3 runs
  python benchmarks/sampling.py --max-new-tokens 96 --out benchmarks/results/sampling_96.json
  python benchmarks/sampling.py --preset 50m --rounds 16 --out /tmp/s50.json
  python benchmarks/sampling.py --checkpoint /tmp/smol/models/smollm2 --rounds 16 --out /tmp/smol.json
  python benchmarks/sampling.py --rounds 20 --torch-rounds 1 --runs 1 --out /tmp/s.json   # quick

Results are printed as a table and written (atomically) as JSON to ``--out`` (default
benchmarks/results/sampling.json; an existing file is replaced only with ``--overwrite``).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

SIDES = ("ours", "ours_plain", "hf_batched", "hf_single")


def _parse(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rounds", type=int, default=100, help="samples per prompt")
  p.add_argument("--prompts", type=int, default=0,
                 help="use the first N occupations of the test set (default: all)")
  p.add_argument("--torch-rounds", type=int, default=3,
                 help="hf_single: samples per prompt (rate extrapolated)")
  p.add_argument("--max-new-tokens", type=int, default=16)
  p.add_argument("--stop-at-eos", action="store_true",
                 help="stop at end of turn (default: every side generates --max-new-tokens)")
  p.add_argument("--batch-size", type=int, default=256, help="ours: rows decoded together")
  p.add_argument("--torch-threads", default="1,0",
                 help="hf_single: comma-separated torch thread counts to try (0: cores); the "
                 "fastest is its figure (default: %(default)s); hf_batched uses all cores")
  p.add_argument("--sides", default=",".join(SIDES),
                 help="comma-separated sides to run (default: %(default)s)")
  p.add_argument("--runs", type=int, default=3,
                 help="alternating measurement rounds of the sides (default: %(default)s)")
  src = p.add_mutually_exclusive_group()
  src.add_argument("--preset", default="tiny", help="tiny or 50m (random weights)")
  src.add_argument("--checkpoint", default=None,
                   help="a converted distfair checkpoint directory (real weights, its tokenizer)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=os.path.join(_common.RESULTS_DIR, "sampling.json"))
  p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
  args = p.parse_args(argv)
  if os.path.exists(args.out) and not args.overwrite:  # before minutes of measuring
    p.error(f"--out: {args.out} exists; pass --overwrite to replace it")
  sides = [s for s in args.sides.split(",") if s]
  if not sides or any(s not in SIDES for s in sides):
    p.error(f"--sides: expected a comma-separated subset of {','.join(SIDES)}, got {args.sides!r}")
  args.sides = [s for s in SIDES if s in sides]
  if args.preset not in ("tiny", "50m"):
    p.error(f"--preset: expected tiny or 50m, got {args.preset!r}")
  for name in ("rounds", "torch_rounds", "max_new_tokens", "runs", "batch_size"):
    if getattr(args, name) < 1:
      p.error(f"--{name.replace('_', '-')}: expected an integer >= 1")
  return args


# ------------------------------------------------------------------------------------------------
# Models and FLOPs


def _random_model(preset: str, seed: int, workdir: str):
  """(jax model, tokenizer, HF directory, label) for random weights of ``preset``."""
  from flax import nnx
  from distfair_jax.convert import hf as convert
  from distfair_jax.model.llama import Llama, LlamaConfig
  from distfair_jax.model.presets import get_preset
  from distfair_jax.data.tokenizer import build_tiny_tokenizer
  tokenizer = build_tiny_tokenizer()
  config = get_preset("tiny") if preset == "tiny" else LlamaConfig(**_common.MODEL_50M)
  model = Llama(config, rngs=nnx.Rngs(seed))
  flax_dir, hf_dir = os.path.join(workdir, "flax"), os.path.join(workdir, "hf")
  convert.save_pretrained(flax_dir, model, config, tokenizer)
  convert.flax_to_hf(flax_dir, hf_dir)
  return model, tokenizer, hf_dir, f"preset {preset} (random weights)"


def _checkpoint_model(path: str, workdir: str):
  """(jax model, tokenizer, HF directory, label) of a converted checkpoint directory (float32)."""
  from distfair_jax.convert import hf as convert
  from distfair_jax.model.loader import load_pretrained
  model, tokenizer, _ = load_pretrained(path, dtype="float32")
  if tokenizer is None:
    raise SystemExit(f"--checkpoint: {path}: expected its tokenizer files, found none")
  hf_dir = os.path.join(workdir, "hf")
  convert.flax_to_hf(path, hf_dir, dtype="float32")
  return model, tokenizer, hf_dir, f"checkpoint {os.path.basename(os.path.normpath(path))}"


def matmul_peak_flops(n: int = 2048, reps: int = 5) -> float:
  """FLOP/s of the best of ``reps`` float32 [n, n] @ [n, n] matmuls in JAX (after a warm-up)."""
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  mm = jax.jit(jnp.matmul)
  mm(a, b).block_until_ready()
  best = math.inf
  for _ in range(reps):
    t0 = time.perf_counter()
    mm(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n ** 3 / best


def token_flops(config, num_params: int, prompt_length: float, new_tokens: float) -> float:
  """FLOPs of one decoded token, averaged over a sample: 2 x matmul parameters (every parameter
  but the norms and, when untied, the input embedding table, which is a lookup) plus attention:
  4 x layers x heads x head_dim x the mean attended length (prompt + half the new tokens)."""
  d, v, layers = config.hidden_size, config.vocab_size, config.num_hidden_layers
  norms = d * (2 * layers + 1)
  matmul_params = num_params - norms - (0 if config.tie_word_embeddings else v * d)
  attended = prompt_length + (new_tokens + 1) / 2
  attention = 4 * layers * config.num_attention_heads * config.head_dim * attended
  return 2.0 * matmul_params + attention


# ------------------------------------------------------------------------------------------------
# Sides


class _Ours:
  """Our sampler on the workload; ``run(seed)`` times one full pass (text decoded)."""

  def __init__(self, model, tokenizer, prompt_ids, steering_ids, stop_ids, pad_id, args,
               shared_prefix: bool | None):
    from distfair_jax.evaluation import sample
    from distfair_jax.config import DecodeConfig
    self.sampler, self.state = sample.Sampler.of(model, shared_prefix=shared_prefix)
    self.ids = prompt_ids
    self.kw = dict(rounds=args.rounds, config=DecodeConfig(max_new_tokens=args.max_new_tokens),
                   steering="model", steering_ids=steering_ids, stop_ids=stop_ids,
                   pad_id=pad_id, batch_size=args.batch_size, tokenizer=tokenizer)
    t0 = time.perf_counter()
    self.sampler.generate(self.state, self.ids, seed=args.seed + 1000, **self.kw)  # compiles
    self.first_call_s = time.perf_counter() - t0

  def run(self, seed: int) -> dict:
    t0 = time.perf_counter()
    out = self.sampler.generate(self.state, self.ids, seed=seed, **self.kw)
    wall = time.perf_counter() - t0
    n = len(out.text)
    new_tokens = int(out.num_tokens.sum()) - n  # the steering token is not counted
    return {"samples": n, "wall_s": wall, "samples_per_s": n / wall, "tokens_per_s": new_tokens / wall,
            "mean_new_tokens": new_tokens / n,
            "steering_share_1": float((out.steering_index == 1).mean())}


class _HF:
  """transformers ``generate`` on the same weights: ``batched`` (all rounds of a prompt in one
  call) or one sample at a time."""

  def __init__(self, hf_dir, tokenizer, prompt_ids, steering_ids, stop_ids, pad_id, args):
    import torch
    from transformers import AutoModelForCausalLM
    self.torch, self.tokenizer, self.args = torch, tokenizer, args
    self.model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    self.model.eval()
    self.prompt_ids = prompt_ids
    self.steer = torch.tensor(steering_ids)
    n = args.max_new_tokens
    self.gen_kw = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=n,
                       min_new_tokens=1 if args.stop_at_eos else n, use_cache=True,
                       eos_token_id=list(stop_ids) or None, pad_token_id=pad_id)

  def _samples(self, ids, count: int) -> int:
    """``count`` samples of prompt ``ids`` [1, L] in one generate call; returns new tokens."""
    torch = self.torch
    logits = self.model(input_ids=ids).logits[0, -1, self.steer]
    digits = torch.multinomial(torch.softmax(logits, -1), count, replacement=True)  # [count]
    inp = torch.cat([ids.expand(count, -1), self.steer[digits][:, None]], dim=1)
    gen = self.model.generate(inp, attention_mask=torch.ones_like(inp), **self.gen_kw)
    cont = gen[:, inp.shape[1]:]
    texts = self.tokenizer.batch_decode(cont, skip_special_tokens=True)
    assert len(texts) == count
    stop = torch.tensor(self.gen_kw["eos_token_id"] or [-1])
    lengths = [int(torch.isin(row, stop).nonzero()[0, 0]) + 1 if torch.isin(row, stop).any()
               else row.shape[0] for row in cont]
    return sum(lengths)

  def _pass(self, per_prompt: int, batched: bool) -> tuple[int, int, float]:
    torch = self.torch
    n = new_tokens = 0
    t0 = time.perf_counter()
    for prompt_ids in self.prompt_ids:
      ids = torch.tensor([prompt_ids])
      for _ in range(1 if batched else per_prompt):
        new_tokens += self._samples(ids, per_prompt if batched else 1)
      n += per_prompt
    return n, new_tokens, time.perf_counter() - t0

  def run(self, seed: int, *, batched: bool, threads: int) -> dict:
    torch, args = self.torch, self.args
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    per_prompt = args.rounds if batched else args.torch_rounds
    with torch.inference_mode():
      self._samples(torch.tensor([self.prompt_ids[0]]), min(per_prompt, 2))  # warm-up, untimed
      n, new_tokens, wall = self._pass(per_prompt, batched)
    return {"samples": n, "wall_s": wall, "samples_per_s": n / wall,
            "tokens_per_s": new_tokens / wall, "mean_new_tokens": new_tokens / n,
            "torch_threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------------------
# Summaries


def _summary(runs: list[dict], flops_per_token: float, peak: float) -> dict:
  rates = [r["samples_per_s"] for r in runs]
  toks = [r["tokens_per_s"] for r in runs]
  med_tok = statistics.median(toks)
  return {"samples_per_s_min": min(rates), "samples_per_s_median": statistics.median(rates),
          "samples_per_s_max": max(rates), "tokens_per_s_min": min(toks),
          "tokens_per_s_median": med_tok, "tokens_per_s_max": max(toks),
          "samples": runs[0]["samples"], "wall_s_median": statistics.median(r["wall_s"] for r in runs),
          "mean_new_tokens": statistics.mean(r["mean_new_tokens"] for r in runs),
          "decode_flops_per_s_median": med_tok * flops_per_token,
          "peak_fraction_median": med_tok * flops_per_token / peak}


def _ratio(ours_runs: list[dict], other_runs: list[dict], ours: dict, other: dict) -> dict:
  per_run = [o["samples_per_s"] / r["samples_per_s"] for o, r in zip(ours_runs, other_runs)]
  return {"median_ratio": ours["samples_per_s_median"] / other["samples_per_s_median"],
          "per_run_min": min(per_run), "per_run_max": max(per_run), "per_run": per_run}


def _load_average() -> list[float]:
  return [round(x, 2) for x in os.getloadavg()]


def main(argv=None) -> int:
  args = _parse(argv)
  if args.checkpoint is not None and not os.path.isdir(args.checkpoint):
    print(f"sampling: skipped: --checkpoint {args.checkpoint} does not exist (a directory written "
          f"by `distfair convert gguf-to-flax` or `hf-to-flax` is needed)")
    return 0
  cores = _common.set_threads()
  import jax
  import torch
  torch.set_num_threads(cores)
  jax.config.update("jax_platforms", "cpu")
  from distfair_jax.data.build import build_dataset
  from distfair_jax.data.tokenize import Encoder
  from distfair_jax.model.presets import param_stats
  load_before = _load_average()
  dataset = build_dataset("gender_real_us", test_rounds=1)
  prompts = [r["prompt"] for r in dataset["test_v2"]]
  prompts = prompts[:args.prompts] if args.prompts > 0 else prompts
  threads = [int(t) or cores for t in args.torch_threads.split(",")]
  peaks = [matmul_peak_flops()]
  with tempfile.TemporaryDirectory(prefix="distfair-bench-") as tmp:
    if args.checkpoint is not None:
      model, tokenizer, hf_dir, label = _checkpoint_model(args.checkpoint, tmp)
    else:
      model, tokenizer, hf_dir, label = _random_model(args.preset, args.seed, tmp)
    encoder = Encoder(tokenizer, attribute=dataset.spec.attribute)
    steering_ids = [int(i) for i in encoder.steering_ids]
    stop_ids = list(encoder.stop_ids) if args.stop_at_eos else []
    prompt_ids = encoder.encode_prompts(prompts)
    common = (tokenizer, prompt_ids, steering_ids, stop_ids, encoder.pad_id, args)
    sides: dict[str, Any] = {}
    for name in args.sides:
      if name in ("ours", "ours_plain"):
        sides[name] = _Ours(model, *common, shared_prefix=None if name == "ours" else False)
    hf = _HF(hf_dir, *common) if {"hf_batched", "hf_single"} & set(args.sides) else None
    runs: dict[str, list[dict]] = {n: [] for n in args.sides if n != "hf_single"}
    runs.update({f"hf_single_{t}": [] for t in threads} if "hf_single" in args.sides else {})
    for i in range(args.runs):  # alternate the sides
      seed = args.seed + i
      for name in args.sides:
        if name in ("ours", "ours_plain"):
          runs[name].append(sides[name].run(seed))
        elif name == "hf_batched":
          runs[name].append(hf.run(seed, batched=True, threads=cores))
        else:
          for t in threads:
            runs[f"hf_single_{t}"].append(hf.run(seed, batched=False, threads=t))
      print(f"run {i + 1}/{args.runs} done, load {_load_average()}", flush=True)
  peaks.append(matmul_peak_flops())
  load_after = _load_average()
  peak = max(peaks)
  config = model.config
  num_params = param_stats(config).num_params
  prompt_length = statistics.mean(len(p) for p in prompt_ids)
  flops = token_flops(config, num_params, prompt_length, args.max_new_tokens)
  summaries = {n: _summary(r, flops, peak) for n, r in runs.items()}
  if "hf_single" in args.sides:  # the fastest thread count stands for hf_single
    best = max(threads, key=lambda t: summaries[f"hf_single_{t}"]["samples_per_s_median"])
    summaries["hf_single"] = summaries[f"hf_single_{best}"] | {"torch_threads": best}
    runs["hf_single"] = runs[f"hf_single_{best}"]
  ratios = {}
  if "ours" in summaries:
    for other in ("ours_plain", "hf_batched", "hf_single"):
      if other in summaries:
        ratios[f"ours/{other}"] = _ratio(runs["ours"], runs[other], summaries["ours"],
                                         summaries[other])

  workload = (f"gender_real_us v2: {len(prompts)} occupations x {args.rounds} rounds, model "
              f"steering, {args.max_new_tokens} new tokens "
              f"({'stop at end of turn' if args.stop_at_eos else 'no early stop'})")
  print(f"\nworkload: {workload}; {label}, {num_params / 1e6:.1f}M parameters; prompt "
        f"{prompt_length:.0f} tokens (mean); {cores} cores; {args.runs} alternating run(s); load "
        f"{load_before} before, {load_after} after; matmul peak {peak / 1e9:.0f} GFLOP/s; "
        f"{flops / 1e6:.2f} MFLOP per new token")
  rows = []
  for name, s in summaries.items():
    if (name.startswith("hf_single_") and len(threads) == 1) or (
        name == "hf_single" and len(threads) > 1):
      continue
    label_ = f"hf_single, {name.rsplit('_', 1)[1]} thread(s)" if name.startswith("hf_single_") else name
    rows.append([label_, s["samples"], s["samples_per_s_min"], s["samples_per_s_median"],
                 s["samples_per_s_max"], s["tokens_per_s_min"], s["tokens_per_s_median"],
                 s["tokens_per_s_max"], s["mean_new_tokens"], f"{100 * s['peak_fraction_median']:.1f}%"])
  print(_common.table(rows, ["side", "samples", "samples/s min", "median", "max", "tokens/s min",
                             "median", "max", "new tok/sample", "of peak"]))
  for key, r in ratios.items():
    print(f"{key}: {r['median_ratio']:.2f}x (ratio of medians); per run {r['per_run_min']:.2f}x .. "
          f"{r['per_run_max']:.2f}x")
  for name in ("ours", "ours_plain"):
    if name in sides:
      print(f"{name}: first call incl. compile {sides[name].first_call_s:.1f} s")
  if "hf_single" in summaries:
    print(f"hf_single: the fastest thread count ({summaries['hf_single']['torch_threads']}) counts; "
          f"measured on {summaries['hf_single']['samples']} samples per run "
          f"({args.torch_rounds} per prompt), its rate extrapolated to the workload")
  result = {"benchmark": "sampling", "workload": workload, "model": label,
            "num_params": num_params, "max_new_tokens": args.max_new_tokens,
            "stop_at_eos": args.stop_at_eos, "rounds": args.rounds, "prompts": len(prompts),
            "mean_prompt_tokens": prompt_length, "batch_size": args.batch_size, "runs": args.runs,
            "command": _common.command_line(), "machine": _common.machine_info(),
            "load_average_before": load_before, "load_average_after": load_after,
            "matmul_peak_flops": peak, "matmul_peak_flops_measured": peaks,
            "flops_per_new_token": flops, "sides": summaries, "ratios": ratios,
            "first_call_s_incl_compile": {n: s.first_call_s for n, s in sides.items()},
            "all_runs": runs}
  _common.write_json(args.out, result, args.overwrite)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
