"""Evaluation throughput (samples/s): our batched KV-cached sampler vs the reference formulation.

Workload: the v2 test set of ``gender_real_us`` (14 occupations x ``--rounds`` samples), with model
steering: the steering digit drawn from the softmax over the two digit logits at the first assistant
position, written as the first assistant token, then ``--max-new-tokens`` tokens sampled at
temperature 1 (stop at end of turn), decoded to text.

- ours: ``distfair_jax.sample.generate`` (each distinct prompt prefilled once, its rounds decoded
  together in one jit-compiled ``while_loop`` over the KV cache). Timed after one warm-up call (the
  compile time is reported separately).
- reference: the original implementation's formulation in PyTorch / Hugging Face: one sample at a
  time, a forward pass for the digit distribution, then ``model.generate(do_sample=True)`` on the
  prompt + digit. Slow, so it runs ``--torch-rounds`` rounds per occupation and its per-sample rate
  is extrapolated to the full workload (said so in the output). It runs once per thread count in
  ``--torch-threads`` and the fastest counts (on a busy machine one thread beats oversubscribed
  ones by several times for this tiny model).

The same tiny model (the ``tiny`` preset, random weights, the built-in tiny tokenizer) is used on
both sides: built in JAX, written with ``distfair_jax.convert`` and loaded by transformers.

  python benchmarks/sampling.py                        # 14 x 100 ours, 14 x 3 torch
  python benchmarks/sampling.py --rounds 20 --torch-rounds 1 --out /tmp/s.json   # quick

Results are printed as a table and written (atomically) as JSON to ``--out``
(default benchmarks/results/sampling.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import jax

_RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
_TORCH_DEFAULT_THREADS = 0  # set in main() before any thread count is changed


def _parse(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rounds", type=int, default=100, help="ours: samples per occupation")
  p.add_argument("--torch-rounds", type=int, default=3,
                 help="reference: samples per occupation (rate extrapolated)")
  p.add_argument("--max-new-tokens", type=int, default=16)
  p.add_argument("--batch-size", type=int, default=256, help="ours: rows decoded together")
  p.add_argument("--torch-threads", default="1,0",
                 help="reference: comma-separated torch thread counts to try (0: torch's default); "
                 "the fastest is the reference figure (default: %(default)s)")
  p.add_argument("--preset", default="tiny")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=os.path.join(_RESULTS_DIR, "sampling.json"))
  return p.parse_args(argv)


def _build(preset: str, seed: int, workdir: str):
  """(jax model, tokenizer, HF directory) for the same random weights."""
  from flax import nnx
  from distfair_jax import convert
  from distfair_jax.model.llama import Llama
  from distfair_jax.model.presets import get_preset
  from distfair_jax.tokenizer import build_tiny_tokenizer
  tokenizer = build_tiny_tokenizer()
  config = get_preset(preset)
  model = Llama(config, rngs=nnx.Rngs(seed))
  flax_dir = os.path.join(workdir, "flax")
  hf_dir = os.path.join(workdir, "hf")
  convert.save_pretrained(flax_dir, model, config, tokenizer)
  convert.flax_to_hf(flax_dir, hf_dir)
  return model, tokenizer, hf_dir


def _ours(model, tokenizer, prompts, steering_ids, stop_ids, args):
  from distfair_jax import sample
  from distfair_jax.data.tokenize import Encoder
  encoder = Encoder(tokenizer)
  ids = [encoder.prompt_ids(p) for p in prompts]
  kw = dict(rounds=args.rounds, config=sample.DecodeConfig(max_new_tokens=args.max_new_tokens),
            steering="model", steering_ids=steering_ids, stop_ids=stop_ids,
            pad_id=encoder.pad_id, batch_size=args.batch_size, tokenizer=tokenizer)
  t0 = time.perf_counter()
  sample.generate(model, ids, seed=args.seed + 1, **kw)  # warm-up: compiles
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  out = sample.generate(model, ids, seed=args.seed, **kw)
  wall = time.perf_counter() - t0
  n = len(out.text)
  return {"samples": n, "wall_s": wall, "samples_per_s": n / wall,
          "first_call_s_incl_compile": first,
          "mean_new_tokens": float(out.num_tokens.mean()) - 1.0,  # steering token not counted
          "steering_share_1": float((out.steering_index == 1).mean())}


def _reference(hf_dir, tokenizer, prompts, steering_ids, stop_ids, args, threads: int):
  import torch
  from transformers import AutoModelForCausalLM
  from distfair_jax.data.tokenize import Encoder
  torch.set_num_threads(threads if threads > 0 else _TORCH_DEFAULT_THREADS)
  torch.manual_seed(args.seed)
  model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
  model.eval()
  encoder = Encoder(tokenizer)
  steer = torch.tensor(steering_ids)
  n, new_tokens = 0, 0
  t0 = time.perf_counter()
  with torch.inference_mode():
    for prompt in prompts:
      ids = torch.tensor([encoder.prompt_ids(prompt)])
      for _ in range(args.torch_rounds):
        logits = model(input_ids=ids).logits[0, -1, steer]
        k = int(torch.multinomial(torch.softmax(logits, -1), 1))
        inp = torch.cat([ids, steer[k].view(1, 1)], dim=1)
        gen = model.generate(inp, attention_mask=torch.ones_like(inp), do_sample=True,
                             temperature=1.0, top_p=1.0, top_k=0,
                             max_new_tokens=args.max_new_tokens, eos_token_id=stop_ids,
                             pad_token_id=encoder.pad_id)
        cont = gen[0, inp.shape[1]:]
        tokenizer.decode(cont, skip_special_tokens=True)
        n += 1
        new_tokens += int(cont.shape[0])
  wall = time.perf_counter() - t0
  total = len(prompts) * args.rounds
  rate = n / wall
  return {"samples": n, "wall_s": wall, "samples_per_s": rate,
          "extrapolated_wall_s_for_workload": total / rate, "mean_new_tokens": new_tokens / n,
          "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__}


def main(argv=None) -> int:
  global _TORCH_DEFAULT_THREADS
  import torch
  _TORCH_DEFAULT_THREADS = torch.get_num_threads()
  args = _parse(argv)
  from distfair_jax import sample
  from distfair_jax.data.build import build_dataset
  from distfair_jax.data.tokenize import Encoder
  dataset = build_dataset("gender_real_us", test_rounds=1)
  prompts = [r["prompt"] for r in dataset["test_v2"]]
  with tempfile.TemporaryDirectory(prefix="distfair-bench-") as tmp:
    model, tokenizer, hf_dir = _build(args.preset, args.seed, tmp)
    encoder = Encoder(tokenizer, attribute=dataset.spec.attribute)
    steering_ids = [int(i) for i in encoder.steering_ids]
    stop_ids = sorted(set(sample.stop_token_ids(tokenizer)) | {int(encoder.end_ids[0])})
    ours = _ours(model, tokenizer, prompts, steering_ids, stop_ids, args)
    refs = [_reference(hf_dir, tokenizer, prompts, steering_ids, stop_ids, args, int(t))
            for t in args.torch_threads.split(",")]
  ref = max(refs, key=lambda r: r["samples_per_s"])
  ratio = ours["samples_per_s"] / ref["samples_per_s"]
  workload = f"gender_real_us v2: {len(prompts)} occupations x {args.rounds} rounds"
  print(f"\nworkload: {workload}, model steering, max_new_tokens {args.max_new_tokens}, "
        f"preset {args.preset} (random weights), backend {jax.default_backend()}, "
        f"{os.cpu_count()} CPUs")
  print(f"{'':34s} {'samples':>8s} {'wall s':>9s} {'samples/s':>10s} {'answer tok/sample':>18s}")
  print(f"{'ours (batched, KV cache, jit)':34s} {ours['samples']:8d} {ours['wall_s']:9.2f} "
        f"{ours['samples_per_s']:10.1f} {ours['mean_new_tokens']:18.1f}")
  for r in refs:
    name = f"reference, torch {r['torch_threads']} thread(s)"
    print(f"{name:34s} {r['samples']:8d} {r['wall_s']:9.2f} {r['samples_per_s']:10.1f} "
          f"{r['mean_new_tokens']:18.1f}")
  print(f"speed-up vs the fastest reference: {ratio:.1f}x (goal >= 20x). Reference measured on {ref['samples']} samples "
        f"({args.torch_rounds} per occupation) and extrapolated: "
        f"{ref['extrapolated_wall_s_for_workload']:.1f} s for the workload. Ours: first call "
        f"incl. compile {ours['first_call_s_incl_compile']:.1f} s.")
  result = {"benchmark": "sampling", "workload": workload, "max_new_tokens": args.max_new_tokens,
            "preset": args.preset, "backend": jax.default_backend(), "cpus": os.cpu_count(),
            "platform": platform.platform(), "jax_version": jax.__version__,
            "batch_size": args.batch_size, "ours": ours, "reference": ref, "reference_runs": refs, "speedup": ratio,
            "note": ("reference rate measured on a subset of rounds and extrapolated per sample"
                     if args.torch_rounds < args.rounds else "")}
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  fd, tmp_path = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(args.out)), suffix=".tmp")
  with os.fdopen(fd, "w") as f:
    json.dump(result, f, indent=2)
  os.replace(tmp_path, args.out)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
