"""Exporting a run to Hugging Face format: ``export_run(run_dir, dst)`` writes a Hugging Face
directory (safetensors + config.json + tokenizer) from the final weights of the run's last finished
stage (``rundir.load_run``), LoRA adapters folded into the base weights, through
``distfair_jax.convert``."""

from __future__ import annotations

import tempfile

from flax import nnx

from distfair_jax import fileio

__all__ = ["export_run"]


def export_run(run_dir, dst, *, stage: str | None = None, overwrite: bool = False,
               max_shard_size: str = "5GB") -> str:
  """Writes ``dst`` as a Hugging Face model directory from the run's final weights; returns the
  stage exported."""
  from distfair_jax import convert
  from distfair_jax.train.rundir import load_run
  fileio.check_new_dir(dst, overwrite)
  loaded, _, stage = load_run(run_dir, stage)
  model = loaded.merged()
  with tempfile.TemporaryDirectory(prefix="distfair-export-") as tmp:
    flax_dir = f"{tmp}/flax"
    convert.save_pretrained(flax_dir, nnx.state(model, nnx.Param), loaded.config, loaded.tokenizer)
    convert.flax_to_hf(flax_dir, dst, max_shard_size=max_shard_size, overwrite=overwrite)
  return stage
