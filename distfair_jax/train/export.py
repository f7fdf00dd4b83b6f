"""Loading a finished (or partly finished) run, and exporting it to Hugging Face format.

``load_run(run_dir)`` rebuilds the run's model from its saved config and the final parameters of its
last finished stage (LoRA adapters folded into the base weights), so evaluation and export see
exactly what training produced. ``export_run(run_dir, dst)`` writes a Hugging Face directory
(safetensors + config.json + tokenizer) through ``distfair_jax.convert``.
"""

from __future__ import annotations

import os
import tempfile

import yaml

from distfair_jax.config import config_from_dict
from distfair_jax.errors import InputError

__all__ = ["load_run", "export_run", "finished_stages"]


def _run_config(run_dir: str):
  path = os.path.join(run_dir, "config.yaml")
  if not os.path.exists(path):
    raise InputError(f"{path}: config: expected a training run directory (with config.yaml), "
                     f"found none")
  with open(path, encoding="utf-8") as f:
    return config_from_dict(yaml.safe_load(f), source=path)


def finished_stages(run_dir: str) -> list[str]:
  from distfair_jax.train.loop import FINAL, SUMMARY
  cfg = _run_config(run_dir)
  return [s for s in cfg.stages if os.path.exists(os.path.join(run_dir, s, FINAL, SUMMARY))]


def load_run(run_dir: str, stage: str | None = None):
  """-> (model with adapters merged, tokenizer, LlamaConfig, run Config, stage name)."""
  from distfair_jax.train.loop import Trainer
  cfg = _run_config(run_dir)
  done = finished_stages(run_dir)
  if stage is None:
    if not done:
      raise InputError(f"{run_dir}: stages: expected at least one finished stage, found none "
                       f"(configured: {', '.join(cfg.stages)})")
    stage = done[-1]
  elif stage not in done:
    raise InputError(f"{run_dir}: stage: expected one of the finished stages {done}, got {stage!r}")
  cfg.logging.tensorboard = False
  cfg.logging.progress = False
  trainer = Trainer(cfg)
  params = trainer.load_final(stage)
  model = trainer.merged_model(params)
  model.eval()
  return model, trainer.tokenizer, trainer.model_config, cfg, stage


def export_run(run_dir: str, dst: str, *, stage: str | None = None, overwrite: bool = False,
               max_shard_size: str = "5GB") -> str:
  """Writes ``dst`` as a Hugging Face model directory from the run's final weights."""
  from distfair_jax import convert
  from flax import nnx
  if os.path.exists(dst) and os.listdir(dst) and not overwrite:
    raise InputError(f"{dst}: output: expected a new or empty directory, got a non-empty one "
                     f"(use --overwrite)")
  model, tokenizer, mcfg, _, stage = load_run(run_dir, stage)
  with tempfile.TemporaryDirectory(prefix="distfair-export-") as tmp:
    flax_dir = os.path.join(tmp, "flax")
    convert.save_pretrained(flax_dir, nnx.state(model, nnx.Param), mcfg, tokenizer)
    convert.flax_to_hf(flax_dir, dst, max_shard_size=max_shard_size, overwrite=overwrite)
  return stage
