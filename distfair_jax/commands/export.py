"""Export: write a training run's final weights as a Hugging Face directory (safetensors).

  distfair export runs/gender_real_uk hf_out/ [--stage hybrid]

LoRA adapters are folded into the base weights; the tokenizer files and generation_config.json are
the source model's, copied unchanged. The result loads with
transformers.AutoModelForCausalLM.from_pretrained and serves with vLLM. RUN_DIR may be a bucket URL
(gs://...). Multi-host (launch/local/multihost.sh N export ...): every process gathers the weights,
the first writes.
"""

from __future__ import annotations

import argparse

DISTRIBUTED = True  # runs as every process of a multi-host job (cli.main starts jax.distributed)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("run_dir", help="a run directory written by `distfair train`")
  parser.add_argument("dst", help="output directory (new or empty)")
  parser.add_argument("--stage", default=None, help="which finished stage (default: the last one)")
  parser.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (default 5GB)")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                      help="tensor dtype (default: the run's parameter dtype)")
  parser.add_argument("--overwrite", action="store_true", help="replace a non-empty dst")


def run(args: argparse.Namespace) -> int:
  from distfair_jax import console
  from distfair_jax import sharding as shd
  from distfair_jax.train.export import export_run
  stage = export_run(args.run_dir, args.dst, stage=args.stage, overwrite=args.overwrite,
                     max_shard_size=args.max_shard_size, dtype=args.dtype,
                     mesh=shd.make_mesh({"data": -1}))
  if console.is_main_process():
    print(f"exported stage {stage} of {args.run_dir} to {args.dst}")
  return 0
