"""Typed configuration: dataclass schemas, YAML composition and dotted overrides.

A config file is YAML whose keys follow ``Config`` below. It may list other files to compose first:

    defaults: [../base.yaml, ../models/tiny.yaml, ../datasets/gender_real_us.yaml]
    run_dir: runs/tiny

``defaults`` paths are relative to the file naming them and are merged in order (each of them may have
defaults of its own), then the file itself, then ``key=value`` overrides from the command line
(``sft.optim.learning_rate=1e-4``). Every merge is checked against the schema by OmegaConf structured
configs: an unknown key, a wrong type or a missing value raises ``InputError`` naming the key and the
file (or "command line") it came from, before anything runs.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from distfair_jax.errors import InputError

__all__ = [
    "Config", "MeshConfig", "ModelConfig", "LoraConfig", "DataConfig", "OptimConfig", "SFTConfig",
    "HybridConfig", "DPOConfig", "CheckpointConfig", "EvalConfig", "LoggingConfig", "load_config",
    "config_to_yaml", "config_to_dict", "config_from_dict",
]


@dataclass
class MeshConfig:
  """Device mesh: sizes of the (data, fsdp, tensor) axes; -1 fills with the remaining devices."""
  data: int = -1
  fsdp: int = 1
  tensor: int = 1


@dataclass
class ModelConfig:
  """Which model to train. ``checkpoint`` (a directory from ``distfair convert hf-to-flax``) wins
  over ``preset``; a preset without checkpoint starts from random weights."""
  preset: str = "tiny"
  overrides: Dict[str, Any] = field(default_factory=dict)
  checkpoint: Optional[str] = None
  tokenizer: Optional[str] = None
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: str = "none"


@dataclass
class LoraConfig:
  """Low-rank adapters (the paper: q and v projections, alpha 16, rank 8-32, dropout 0.05)."""
  enabled: bool = False
  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  targets: List[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclass
class DataConfig:
  """Dataset built in memory by ``distfair_jax.data`` (or read from ``records_dir``)."""
  dataset: str = "gender_real_us"
  spec: Optional[str] = None
  records_dir: Optional[str] = None
  rows_per_occupation: int = 100
  heldout_fraction: float = 0.1
  max_length: int = 1024
  max_prompt_length: int = 512
  prompt_format: str = "chat"
  stories: bool = False
  seed: int = 0


@dataclass
class OptimConfig:
  """optax optimizer and schedule."""
  optimizer: str = "adamw"
  learning_rate: float = 1e-5
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.01
  schedule: str = "constant"
  warmup_steps: int = 150
  clip_norm: float = 1.0
  grad_accum: int = 1


@dataclass
class SFTConfig:
  """Stage 1: supervised fine-tuning on the desirable records."""
  epochs: int = 2
  batch_size: int = 4
  max_steps: int = 0
  average: str = "sequence"
  optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class HybridConfig:
  """Stage 2: KTO + steering-token KL, reference = the stage-1 model."""
  epochs: int = 3
  batch_size: int = 8
  max_steps: int = 0
  beta: float = 0.1
  desirable_weight: float = 1.0
  undesirable_weight: float = 1.0
  kl_weight: float = 1.0
  ablation: str = "full"
  renormalize: bool = False
  reference: str = "online"
  layout: str = "auto"
  optim: OptimConfig = field(default_factory=lambda: OptimConfig(learning_rate=1e-6))


@dataclass
class DPOConfig:
  """The DPO baseline (started from the IFT model)."""
  epochs: int = 3
  batch_size: int = 4
  max_steps: int = 0
  beta: float = 0.1
  label_smoothing: float = 0.0
  ipo: bool = False
  layout: str = "auto"
  optim: OptimConfig = field(default_factory=lambda: OptimConfig(learning_rate=1e-6))


@dataclass
class CheckpointConfig:
  """orbax checkpointing: every ``every_steps`` steps (0: only at the end of a stage)."""
  every_steps: int = 0
  keep: int = 2
  async_save: bool = True


@dataclass
class EvalConfig:
  """Held-out evaluation during training (losses and exact steering MAE)."""
  every_steps: int = 0
  max_batches: int = 8


@dataclass
class LoggingConfig:
  every_steps: int = 1
  tensorboard: bool = True
  progress: bool = True


@dataclass
class Config:
  """The whole run. ``stages`` lists what ``distfair train`` runs, in order: sft, hybrid, ift, dpo."""
  run_dir: str = MISSING
  seed: int = 0
  stages: List[str] = field(default_factory=lambda: ["sft", "hybrid"])
  mesh: MeshConfig = field(default_factory=MeshConfig)
  model: ModelConfig = field(default_factory=ModelConfig)
  lora: LoraConfig = field(default_factory=LoraConfig)
  data: DataConfig = field(default_factory=DataConfig)
  sft: SFTConfig = field(default_factory=SFTConfig)
  hybrid: HybridConfig = field(default_factory=HybridConfig)
  dpo: DPOConfig = field(default_factory=DPOConfig)
  checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
  eval: EvalConfig = field(default_factory=EvalConfig)
  logging: LoggingConfig = field(default_factory=LoggingConfig)


_CHOICES = {
    "stages": {"sft", "hybrid", "ift", "dpo"},
    "model.dtype": {"float32", "bfloat16"},
    "model.param_dtype": {"float32", "bfloat16"},
    "model.remat": {"none", "full", "dots"},
    "data.prompt_format": {"chat", "reference"},
    "sft.average": {"sequence", "token"},
    "hybrid.ablation": {"full", "kl_only", "kto_only"},
    "hybrid.reference": {"online", "cached"},
    "hybrid.layout": {"auto", "packed", "rows"},
    "dpo.layout": {"auto", "packed", "rows"},
    "sft.optim.optimizer": {"adamw", "rmsprop", "sgd"},
    "sft.optim.schedule": {"constant", "cosine"},
}
for _stage in ("hybrid", "dpo"):
  _CHOICES[f"{_stage}.optim.optimizer"] = _CHOICES["sft.optim.optimizer"]
  _CHOICES[f"{_stage}.optim.schedule"] = _CHOICES["sft.optim.schedule"]


def _first_line(message: str) -> str:
  return str(message).strip().splitlines()[0] if str(message).strip() else "invalid value"


def _read_yaml(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      data = yaml.safe_load(f)
  except FileNotFoundError:
    raise InputError(f"{path}: config file not found") from None
  except UnicodeDecodeError:
    raise InputError(f"{path}: not a UTF-8 text file") from None
  except yaml.YAMLError as e:
    mark = getattr(e, "problem_mark", None)
    where = f" (line {mark.line + 1})" if mark is not None else ""
    raise InputError(f"{path}{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
  if data is None:
    return {}
  if not isinstance(data, dict):
    raise InputError(f"{path}: expected a mapping of config keys at the top level, "
                     f"got {type(data).__name__}")
  return data


def _layers(path: str, seen: tuple[str, ...] = ()) -> list[tuple[str, dict]]:
  """The (file, mapping) layers of a config file, its ``defaults`` first, depth first."""
  path = os.path.abspath(path)
  if path in seen:
    raise InputError(f"{path}: defaults: circular reference through {' -> '.join(seen)}")
  data = _read_yaml(path)
  defaults = data.pop("defaults", [])
  if isinstance(defaults, str):
    defaults = [defaults]
  if not isinstance(defaults, list) or not all(isinstance(d, str) for d in defaults):
    raise InputError(f"{path}: defaults: expected a list of file paths, got {defaults!r}")
  layers: list[tuple[str, dict]] = []
  for d in defaults:
    layers.extend(_layers(os.path.join(os.path.dirname(path), d), seen + (path,)))
  layers.append((path, data))
  return layers


def _merge(base, layer, source: str):
  try:
    return OmegaConf.merge(base, layer)
  except OmegaConfBaseException as e:
    key = getattr(e, "full_key", None) or "?"
    msg = _first_line(getattr(e, "msg", None) or str(e))
    raise InputError(f"{source}: {key}: {msg}") from None


def _get(cfg: Any, key: str) -> Any:
  for part in key.split("."):
    cfg = getattr(cfg, part)
  return cfg


def _check_choices(cfg: Config, source: str) -> None:
  for key, allowed in _CHOICES.items():
    value = _get(cfg, key)
    values = value if isinstance(value, (list, tuple)) else [value]
    for v in values:
      if v not in allowed:
        raise InputError(f"{source}: {key}: expected one of {sorted(allowed)}, got {v!r}")
  if not cfg.stages:
    raise InputError(f"{source}: stages: expected at least one of sft, hybrid, ift, dpo")
  for key in ("sft.batch_size", "hybrid.batch_size", "dpo.batch_size", "lora.rank"):
    if _get(cfg, key) < 1:
      raise InputError(f"{source}: {key}: expected a positive integer")
  if cfg.hybrid.batch_size < 2 or cfg.hybrid.batch_size % 2:
    raise InputError(f"{source}: hybrid.batch_size: expected an even number >= 2 (each row's "
                     f"desirable and undesirable examples sit side by side, and the KTO reference "
                     f"point needs mismatched pairs from other rows), got {cfg.hybrid.batch_size}")


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None) -> Config:
  """Compose ``path`` (and its defaults) with ``key=value`` overrides into a checked ``Config``."""
  cfg = OmegaConf.structured(Config)
  last_source = "defaults"
  if path is not None:
    for source, data in _layers(path):
      cfg = _merge(cfg, data, source)
      last_source = source
  if overrides:
    for item in overrides:
      if "=" not in item:
        raise InputError(f"command line: {item!r}: expected key=value")
    try:
      dotlist = OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as e:
      raise InputError(f"command line: {_first_line(e)}") from None
    cfg = _merge(cfg, dotlist, "command line")
  missing = sorted(OmegaConf.missing_keys(cfg))
  if missing:
    raise InputError(f"{last_source}: {missing[0]}: missing value (set it in the file or as "
                     f"{missing[0]}=... on the command line)")
  obj = OmegaConf.to_object(cfg)
  _check_choices(obj, "command line" if overrides else last_source)
  return obj


def config_to_dict(cfg: Config) -> dict[str, Any]:
  return dataclasses.asdict(cfg)


def config_from_dict(data: dict[str, Any], source: str = "config") -> Config:
  """The inverse of ``config_to_dict``, checked like a file (used to read a run's saved config)."""
  cfg = _merge(OmegaConf.structured(Config), data, source)
  obj = OmegaConf.to_object(cfg)
  _check_choices(obj, source)
  return obj


def config_to_yaml(cfg: Config) -> str:
  return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
