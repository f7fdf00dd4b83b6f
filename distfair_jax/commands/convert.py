"""Convert checkpoints between Hugging Face safetensors and distfair (orbax) directories.

  distfair convert hf-to-flax SRC DST [--dtype bfloat16|float32] [--overwrite]
  distfair convert gguf-to-flax FILE.gguf DST [--dtype bfloat16|float32] [--overwrite]
  distfair convert flax-to-hf SRC DST [--max-shard-size 5GB] [--dtype ...] [--overwrite]
  distfair convert check HF_DIR FLAX_DIR [--threshold 1e-3]

Only safetensors and GGUF files are read (pickled PyTorch *.bin files are refused, never loaded).
GGUF (llama.cpp) files of the llama, qwen3 and gemma3 architectures are dequantized (distfair_jax/gguf.py). Outputs are
written to a temporary directory and renamed into place when complete.
"""

from __future__ import annotations

import argparse

_DTYPES = ("bfloat16", "float32", "float16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
  sub = parser.add_subparsers(dest="convert_command",
                              metavar="{hf-to-flax,gguf-to-flax,flax-to-hf,check}")
  sub.required = True

  p = sub.add_parser("hf-to-flax",
                     help="Hugging Face directory (safetensors) -> distfair directory",
                     description="Stream a local Hugging Face model directory (config.json, "
                     "*.safetensors, tokenizer files) into an orbax checkpoint plus "
                     "model_config.json and the tokenizer files.")
  p.add_argument("src", metavar="SRC", help="Hugging Face model directory")
  p.add_argument("dst", metavar="DST", help="output directory (new or empty)")
  p.add_argument("--dtype", choices=_DTYPES, default="bfloat16",
                 help="parameter dtype of the output (default: %(default)s)")
  p.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
  p.set_defaults(_convert=_hf_to_flax)

  p = sub.add_parser("gguf-to-flax",
                     help="GGUF file (llama.cpp: llama, qwen3, gemma3) -> distfair directory",
                     description="Dequantize a llama, qwen3 or gemma3 GGUF file (F32, F16, BF16, Q8_0, Q4_0, Q4_1, "
                     "Q5_0, Q5_1, Q2_K..Q6_K) into an orbax checkpoint plus model_config.json, and "
                     "write the tokenizer and chat template its metadata holds (through "
                     "transformers; needs the gguf package and torch: the gguf extra).")
  p.add_argument("src", metavar="FILE", help="a .gguf file")
  p.add_argument("dst", metavar="DST", help="output directory (new or empty)")
  p.add_argument("--dtype", choices=_DTYPES, default="bfloat16",
                 help="parameter dtype of the output (default: %(default)s)")
  p.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
  p.set_defaults(_convert=_gguf_to_flax)

  p = sub.add_parser("flax-to-hf",
                     help="distfair directory -> Hugging Face directory (safetensors)",
                     description="Write a converted or trained distfair directory as a Hugging "
                     "Face directory that transformers and vLLM load.")
  p.add_argument("src", metavar="SRC", help="distfair directory (params/ + model_config.json)")
  p.add_argument("dst", metavar="DST", help="output directory (new or empty)")
  p.add_argument("--max-shard-size", default="5GB",
                 help="largest safetensors shard, e.g. 5GB, 500MB (default: %(default)s)")
  p.add_argument("--dtype", choices=_DTYPES, default=None,
                 help="tensor dtype of the output (default: the stored dtype)")
  p.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
  p.set_defaults(_convert=_flax_to_hf)

  p = sub.add_parser("check", help="compare a converted directory with its Hugging Face source",
                     description="Run the Hugging Face model (torch, if installed) and ours in "
                     "float32 on a few padded token sequences; print the max absolute logit "
                     "difference and the max KL per position; exit 1 above the threshold.")
  p.add_argument("hf_dir", metavar="HF_DIR", help="Hugging Face model directory")
  p.add_argument("flax_dir", metavar="FLAX_DIR", help="distfair directory")
  p.add_argument("--threshold", type=float, default=1e-3,
                 help="largest acceptable max abs logit difference (default: %(default)s)")
  p.add_argument("--sequences", type=int, default=4, help="number of sequences (default: 4)")
  p.add_argument("--length", type=int, default=32, help="sequence length (default: 32)")
  p.add_argument("--seed", type=int, default=0, help="seed of the random tokens (default: 0)")
  p.set_defaults(_convert=_check)


def run(args: argparse.Namespace) -> int:
  return args._convert(args)


def _hf_to_flax(args) -> int:
  from distfair_jax.convert.hf import hf_to_flax
  dst = hf_to_flax(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite, progress=True)
  print(f"wrote {dst}")
  return 0


def _gguf_to_flax(args) -> int:
  from distfair_jax.convert.gguf import gguf_to_flax
  dst = gguf_to_flax(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite, progress=True)
  print(f"wrote {dst}")
  return 0


def _flax_to_hf(args) -> int:
  from distfair_jax.convert.hf import flax_to_hf
  dst = flax_to_hf(args.src, args.dst, max_shard_size=args.max_shard_size, dtype=args.dtype,
                   overwrite=args.overwrite, progress=True)
  print(f"wrote {dst}")
  return 0


def _check(args) -> int:
  from distfair_jax.convert.hf import check
  from distfair_jax.errors import InputError
  if args.sequences < 1 or args.length < 2:
    raise InputError(f"--sequences/--length: expected >= 1 / >= 2, got {args.sequences} / "
                     f"{args.length}")
  r = check(args.hf_dir, args.flax_dir, num_sequences=args.sequences, length=args.length,
            seed=args.seed)
  print(f"max abs weight difference: {r['max_abs_weight_diff']:.3e}")
  if not r["torch"]:
    print("torch is not installed: compared weights only (install torch to compare logits)")
    value, what = r["max_abs_weight_diff"], "weight"
  else:
    print(f"max abs logit difference:  {r['max_abs_logit_diff']:.3e}  "
          f"({args.sequences} sequences x {args.length} tokens, float32, left/right padding)")
    print(f"max KL(hf || ours) per position: {r['max_kl']:.3e}")
    value, what = r["max_abs_logit_diff"], "logit"
  ok = value <= args.threshold
  print(f"{'OK' if ok else 'FAIL'}: max abs {what} difference {value:.3e} "
        f"{'<=' if ok else '>'} threshold {args.threshold:g}")
  return 0 if ok else 1
