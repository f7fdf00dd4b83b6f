"""The training recipe: ``train(cfg)`` runs ``cfg.stages`` in order under ``cfg.run_dir``.

Each stage starts from the previous stage's final parameters (the first from the base model) and,
for ``hybrid`` and ``dpo``, uses them frozen as the reference. A rerun of the same command skips
finished stages and resumes an unfinished one from its latest complete checkpoint (``train.loop``).
The run directory's layout is in ``train.rundir``.

What the stages share lives in a ``RunContext``: the config, the run directory, the mesh, the model
(``model.loader.load_model``), the one ``Encoder`` of the run's tokenizer, the steering token ids, the
records split into training and held-out parts (by prompt), and the metrics writer.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from distfair_jax import console
from distfair_jax import fileio
from distfair_jax import memory
from distfair_jax import sharding as shd
from distfair_jax.config import Config, with_absolute_paths
from distfair_jax.data import build as build_lib
from distfair_jax.data.tokenize import Encoder
from distfair_jax.model.loader import LoadedModel, load_model
from distfair_jax.train.heldout import split_heldout
from distfair_jax.train.loop import run_stage
from distfair_jax.train import runlock
from distfair_jax.train.preemption import SigtermFlag
from distfair_jax.train.rundir import RunDir
from distfair_jax.train.stages import make_stage
from distfair_jax.train.stages.common import packing_estimate
from distfair_jax.train.writer import MetricsWriter

__all__ = ["train", "RunContext", "PROMPT_EXAMPLE"]

PROMPT_EXAMPLE = "prompt.json"  # the run's prompt settings and one rendered prompt


@dataclasses.dataclass
class RunContext:
  """What every stage of a run shares (see the module docstring)."""
  cfg: Config
  run: RunDir
  mesh: Any
  model: LoadedModel
  encoder: Encoder
  steering_ids: jax.Array
  train_records: dict[str, list[dict]]
  heldout_records: dict[str, list[dict]]
  writer: MetricsWriter
  rngs: Any
  _packing_ratio: float | None = None

  @property
  def batch_devices(self) -> int:
    return self.mesh.shape.get("data", 1) * self.mesh.shape.get("fsdp", 1)

  @property
  def show_progress(self) -> bool:
    return self.cfg.logging.progress and console.is_main_process()

  def packing_ratio(self, records) -> float:
    """The estimated packed / rows compute of the run's KTO pairs (computed once)."""
    if self._packing_ratio is None:
      self._packing_ratio = packing_estimate(records, self.encoder)
    return self._packing_ratio

  def packing_pays(self, stage, records) -> bool:
    return stage.packing_pays(lambda: self.packing_ratio(records))

  def report_memory(self, name: str, report) -> None:
    if report is None:
      return
    line, sizes = report
    console.log(line)
    if console.is_main_process():
      fileio.write_json(self.run.path / f"{name}_memory.json", sizes, indent=None)

  def log_heldout(self, name: str, step: int, metrics: dict[str, float]) -> dict[str, float]:
    self.writer.write(name, step, metrics, split="eval")
    if "steering_mae" in metrics:
      console.log(f"{name}: step {step}: held-out loss {metrics.get('loss', float('nan')):.4f}, "
                  f"exact steering MAE {metrics['steering_mae']:.4f}")
    return metrics


def _context(cfg: Config, records) -> RunContext:
  run = RunDir(cfg.run_dir)
  run.claim(cfg)
  mesh = shd.make_mesh(dataclasses.asdict(cfg.mesh))
  writer = MetricsWriter(run.path, tensorboard=cfg.logging.tensorboard,
                         enabled=console.is_main_process())
  records, spec = build_lib.training_records(cfg.data, records)
  train_records, heldout_records = {}, {}
  for kind, rows in records.items():
    if not kind.startswith("test_"):
      train_records[kind], heldout_records[kind] = split_heldout(
          rows, cfg.data.heldout_fraction, seed=cfg.data.seed)
  model = load_model(cfg.model, cfg.lora, mesh, seed=cfg.seed, tokenizer_dir=run.tokenizer_dir)
  if not (cfg.model.tokenizer or cfg.model.checkpoint) and console.is_main_process() and \
      not run.tokenizer_dir.exists():  # the built-in tiny tokenizer: keep a copy with the run
    with fileio.local_dir_for(run.tokenizer_dir) as tmp:
      model.tokenizer.save_pretrained(tmp)
  encoder = Encoder.for_data(model.tokenizer, cfg.data, attribute=spec.attribute)
  if encoder.chat.date_warning:
    console.log(f"warning: {encoder.chat.date_warning}")
  if console.is_main_process():  # what the template makes of a question, to compare with eval's
    example = encoder.chat.example()
    example["ids"] = encoder.prompt_ids(example["question"])
    fileio.write_json(run.path / PROMPT_EXAMPLE, example, indent=1)
  frac = shd.replicated_fraction((model.params, model.frozen))
  console.log(f"model: {model.name}, {model.num_params / 1e6:.1f}M params, "
              f"{model.num_trainable / 1e6:.3f}M trainable{' (LoRA)' if model.lora else ''}; mesh "
              f"{dict(mesh.shape)}; replicated {frac:.1%}")
  return RunContext(cfg, run, mesh, model, encoder, jnp.asarray(encoder.steering_ids, jnp.int32),
                    train_records, heldout_records, writer, model.rngs)


def train(cfg: Config, *, records: dict[str, list[dict]] | None = None,
          force: bool = False) -> dict[str, Any]:
  """Runs ``cfg.stages`` under ``cfg.run_dir`` (resuming if possible); returns stage summaries.

  records: optional ``{kind: [record, ...]}`` to train on instead of ``cfg.data``'s dataset (the
  demo's biased base model uses it); kinds sft, kto, ift, dpo. The run directory must be one
  (not a file, writable) and is locked for the run (``train.runlock``; ``force``: take over
  another host's lock).
  """
  cfg = with_absolute_paths(cfg)  # recorded so: eval and export find everything from anywhere
  RunDir(cfg.run_dir).create()
  with runlock.hold(cfg.run_dir, force=force):
    return _train(cfg, records)


def _train(cfg: Config, records) -> dict[str, Any]:
  ctx = _context(cfg, records)
  summaries: dict[str, Any] = {}
  params = ctx.model.params
  with SigtermFlag() as sigterm:
    for name in cfg.stages:
      stage = make_stage(name, cfg)
      if ctx.run.stage_done(name):
        console.log(f"{name}: done already, loading its final parameters")
        params = ctx.run.final_params(name, ctx.model.params, ctx.model.param_shardings)
        summaries[name] = ctx.run.summary(name)
        continue
      params, ctx.rngs, summaries[name] = run_stage(ctx, stage, params, sigterm)
      memory.release()  # the stage's optimizer state, batches and step program are gone
  ctx.writer.close()
  return summaries
