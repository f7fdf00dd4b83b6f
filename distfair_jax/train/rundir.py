"""A run directory: where ``distfair train`` writes, and what ``eval`` and ``export`` read back.

    run_dir/
      config.yaml            the resolved config (a rerun with a config that changes the results
                             is refused once a stage has started)
      tokenizer/             the tokenizer used when it is the built-in tiny one
      prompt.json            the prompt settings (system prompt, template variables) and one
                             rendered prompt; eval/metrics.json's meta.prompt_example is the same
      metrics.jsonl          one row per logged step and per held-out evaluation
      tensorboard/           event files
      <stage>/checkpoints/   orbax checkpoints (state, data iterator, config), keep-N
      <stage>/final/         trainable params at the end of the stage + summary.json (stage done)

``load_run(run_dir)`` rebuilds the run's model (``model.loader.load_model`` on the saved config)
with the final parameters of its last finished stage, exactly what training produced.
"""

from __future__ import annotations

import dataclasses
import os

from typing import Any

import jax
import yaml
from flax import nnx

from distfair_jax import distributed
from distfair_jax import fileio
from distfair_jax import sharding as shd
from distfair_jax.config import (PATH_FIELDS, Config, absolute_path, config_from_dict,
                                 config_to_dict, results_affecting)
from distfair_jax.errors import InputError
from distfair_jax.model import checkpoint_io
from distfair_jax.model.loader import load_model, load_pretrained
from distfair_jax.model.modeldir import MODEL_CONFIG
from distfair_jax.train.stages import SECTIONS

# Config fields that change how a step runs, never the weights it trains: a rerun may change them
# (rematerialisation to fit memory, say) and resume.
EXECUTION_FIELDS = ("model.remat",)

__all__ = ["RunDir", "load_run", "CONFIG", "TOKENIZER", "FINAL", "SUMMARY", "CHECKPOINTS",
           "OpenedModel", "model_dir_kind", "open_model_dir"]

CONFIG = "config.yaml"
TOKENIZER = "tokenizer"
FINAL = "final"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _place(value):
  """A path field's value as the place it names: a local path absolute with its symlinks
  resolved; URLs and empty values unchanged."""
  value = absolute_path(value)
  return value if not value or "://" in value else os.path.realpath(value)


class RunDir:
  """Paths and records of one run directory (local or a bucket URL)."""

  def __init__(self, path: Any):
    self.path = fileio.as_path(path)

  def __str__(self) -> str:
    return str(self.path)

  @property
  def config_path(self) -> fileio.Path:
    return self.path / CONFIG

  @property
  def tokenizer_dir(self) -> fileio.Path:
    return self.path / TOKENIZER

  def stage_dir(self, stage: str) -> fileio.Path:
    return self.path / stage

  def checkpoints_dir(self, stage: str) -> fileio.Path:
    return self.stage_dir(stage) / CHECKPOINTS

  def final_dir(self, stage: str) -> fileio.Path:
    return self.stage_dir(stage) / FINAL

  def stage_done(self, stage: str) -> bool:
    return (self.final_dir(stage) / SUMMARY).exists()

  def stage_started(self, stage: str) -> bool:
    ckpts = self.checkpoints_dir(stage)
    return self.stage_done(stage) or (ckpts.exists() and any(True for _ in ckpts.iterdir()))

  def create(self) -> None:
    """Makes the run directory; InputError (one line) if it is a file, under a file or not
    writable: before anything else of a run is done."""
    fileio.writable_dir(self.path, "run_dir")

  def read_config(self) -> Config:
    if not self.config_path.exists():
      raise InputError(f"{self.config_path}: config: expected a training run directory (with "
                       f"{CONFIG}), found none")
    return config_from_dict(yaml.safe_load(fileio.read_text(self.config_path)),
                            source=str(self.config_path))

  def claim(self, cfg: Config) -> None:
    """Records ``cfg`` as this run's config. InputError if the directory holds a run whose stages
    have started with a config that changes the results; a run that never started is replaced.
    ``EXECUTION_FIELDS`` may change, and ``model.scan_layers`` too unless a stage stopped midway
    (its checkpoint holds the layers in the layout it was written in)."""
    current = config_to_dict(cfg)
    if self.config_path.exists():
      previous = yaml.safe_load(fileio.read_text(self.config_path)) or {}
      # Paths compared by where they lead: as this process resolves them (a run recorded before
      # paths were made absolute) and through symlinks (a run directory reached by another path).
      a = {k: (_place(v) if k in PATH_FIELDS else v)
           for k, v in _flat(results_affecting(previous, SECTIONS)).items()}
      b = {k: (_place(v) if k in PATH_FIELDS else v)
           for k, v in _flat(results_affecting(current, SECTIONS)).items()}
      # A field newer than the recorded run had its default's behaviour there.
      defaults = _flat(config_to_dict(Config(run_dir=cfg.run_dir)))
      a.update({k: defaults[k] for k in b if k not in a and k in defaults})
      diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
      started = [s for s in previous.get("stages", []) if self.stage_started(s)]
      # How the layers run, not what they compute: a finished stage's parameters read in either
      # layout; only a stage's own checkpoint (its optimizer state) holds the layers as written.
      if "model.scan_layers" in diff:
        midway = [s for s in started if not self.stage_done(s)]
        if not midway:
          diff.remove("model.scan_layers")
        else:
          started = midway
      diff = [k for k in diff if k not in EXECUTION_FIELDS]
      if diff and started:
        raise InputError(f"{self.config_path}: this run directory holds a run with a different "
                         f"config (differs in {', '.join(diff[:5])}; stages started: "
                         f"{', '.join(started)}); use another run_dir to start a new run")
    if jax.process_index() == 0:
      fileio.write_text(self.config_path, yaml.safe_dump(current, sort_keys=False))

  def finished_stages(self, cfg: Config) -> list[str]:
    return [s for s in cfg.stages if self.stage_done(s)]

  def summary(self, stage: str) -> dict:
    return fileio.read_json(self.final_dir(stage) / SUMMARY, "a stage summary")

  def write_final(self, stage: str, params, summary: dict) -> None:
    """The stage's final trainable parameters, then its summary (which marks the stage done)."""
    final = self.final_dir(stage)
    if final.exists() and jax.process_index() == 0:
      final.rmtree()  # a final dir without summary.json is an interrupted save
    distributed.barrier(f"final-{stage}")
    checkpoint_io.save_params(final / "params", params)
    if jax.process_index() == 0:
      fileio.write_json(final / SUMMARY, summary, indent=1)

  def final_params(self, stage: str, target, shardings):
    """The stage's final trainable parameters restored like ``target`` onto ``shardings``."""
    pure = checkpoint_io.load_params(self.final_dir(stage) / "params", nnx.to_pure_dict(target),
                                     sharding=nnx.to_pure_dict(shardings))
    params = jax.tree.map(lambda x: x, target)
    nnx.replace_by_pure_dict(params, pure)
    return params


def load_run(run_dir: Any, stage: str | None = None, *, mesh=None):
  """-> (LoadedModel with the final parameters of ``stage`` (default: the last finished one), run
  Config, stage name). ``mesh`` places it (default: one device)."""
  run = RunDir(run_dir)
  cfg = run.read_config()
  done = run.finished_stages(cfg)
  if stage is None:
    if not done:
      raise InputError(f"{run}: stages: expected at least one finished stage, found none "
                       f"(configured: {', '.join(cfg.stages)})")
    stage = done[-1]
  elif stage not in done:
    raise InputError(f"{run}: stage: expected one of the finished stages "
                     f"({', '.join(map(str, done)) or 'none'}), got {str(stage)!r}")
  mesh = mesh if mesh is not None else shd.make_mesh({"data": 1}, jax.devices()[:1])
  # Per-layer weights whatever trained them (they are per layer on disk): evaluation decodes
  # token by token, and a Python loop over the layers updates each KV cache in place, where a
  # scan would write the whole stacked cache again at every step.
  model_cfg = dataclasses.replace(cfg.model, scan_layers=False)
  model = load_model(model_cfg, cfg.lora, mesh, seed=cfg.seed, tokenizer_dir=run.tokenizer_dir)
  params = run.final_params(stage, model.params, model.param_shardings)
  return model.with_params(params), cfg, stage


def model_dir_kind(path: Any) -> str:
  """What a model directory holds: ``"run"`` (a training run, config.yaml) or ``"converted"`` (a
  model directory from ``distfair convert``, model_config.json); a one-line InputError else."""
  p = fileio.as_path(path)
  if not p.is_dir():
    raise InputError(f"{p}: model: expected a run or converted model directory, got "
                     f"{'a file' if p.exists() else 'no such directory'}")
  if (p / CONFIG).exists():
    return "run"
  if (p / MODEL_CONFIG).exists():
    return "converted"
  raise InputError(f"{p}: model: expected {CONFIG} (a run) or {MODEL_CONFIG} (a converted "
                   f"model), got neither")


@dataclasses.dataclass(frozen=True)
class OpenedModel:
  """A directory's model (LoRA folded in) and tokenizer; ``kind`` as ``model_dir_kind``; a run's
  ``config`` and evaluated ``stage`` (None for a converted model)."""
  model: Any
  tokenizer: Any
  kind: str
  config: Config | None = None
  stage: str | None = None


def open_model_dir(path: Any, stage: str | None = None, *, mesh=None,
                   dtype: str | None = None) -> OpenedModel:
  """The one reader of "a run or a converted model" (``distfair eval MODEL``, the demo's
  methods): a run's final parameters of ``stage`` (``load_run``), or a converted model
  (``model.loader.load_pretrained``; ``dtype`` overrides its stored dtypes)."""
  kind = model_dir_kind(path)
  if kind == "run":
    loaded, cfg, stage = load_run(path, stage, mesh=mesh)
    return OpenedModel(loaded.merged(), loaded.tokenizer, kind, cfg, stage)
  model, tokenizer, _ = load_pretrained(path, dtype=dtype, mesh=mesh)
  return OpenedModel(model, tokenizer, kind)
