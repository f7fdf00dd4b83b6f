"""Exporting a run to Hugging Face format: ``export_run(run_dir, dst)`` writes a Hugging Face
directory (safetensors + config.json + the tokenizer's files) from the final weights of the run's last
finished stage (``rundir.load_run``), LoRA adapters folded into the base weights.

The tokenizer files and generation_config.json are the source's, copied unchanged (the checkpoint's,
``model.tokenizer``'s, or the run's copy of the built-in tiny tokenizer), so the export loads
wherever the source did (transformers 4.x serving stacks included). Multi-host: every process
gathers the weights; the first writes.
"""

from __future__ import annotations

import tempfile

from flax import nnx

from distfair_jax import console
from distfair_jax import distributed
from distfair_jax import fileio
from distfair_jax.convert import hf as convert
from distfair_jax.train.rundir import load_run

__all__ = ["export_run"]


def export_run(run_dir, dst, *, stage: str | None = None, overwrite: bool = False,
               max_shard_size: str = "5GB", dtype: str | None = None, mesh=None) -> str:
  """Writes ``dst`` as a Hugging Face model directory from the run's final weights; returns the
  stage exported. dtype: the tensors' dtype (default: the run's parameter dtype)."""
  fileio.check_new_dir(dst, overwrite)
  loaded, cfg, stage = load_run(run_dir, stage, mesh=mesh)
  model = loaded.merged()
  flat = {tuple(k): v for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  host = distributed.gather({k: v.get_value() for k, v in flat.items()})
  if console.is_main_process():
    stored = next(iter(host.values())).dtype
    with tempfile.TemporaryDirectory(prefix="distfair-export-") as tmp:
      tok_dir = loaded.tokenizer_dir
      if tok_dir is None:  # built in memory: save it once
        loaded.tokenizer.save_pretrained(tmp)
        tok_dir = tmp
      convert.write_hf(dst, loaded.config, lambda paths: {p: host[p] for p in paths},
                       stored_dtype=stored, tokenizer_dir=tok_dir, max_shard_size=max_shard_size,
                       dtype=dtype, overwrite=overwrite)
  distributed.barrier("export")
  return stage
