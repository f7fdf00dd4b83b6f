"""Typed configuration: frozen dataclass schemas with ``StrEnum`` choices, YAML composition, overrides.

A config file is YAML whose keys follow ``Config`` below. It may list other files to compose first:

    defaults: [../base.yaml, ../models/tiny.yaml, ../datasets/gender_real_us.yaml]
    run_dir: runs/tiny

``defaults`` paths are relative to the file naming them and are merged in order (each of them may have
defaults of its own), then the file itself, then ``key=value`` overrides from the command line
(``sft.optim.learning_rate=1e-4``). Every merge is checked against the schema by OmegaConf structured
configs: an unknown key, a wrong type, a value outside an enum or a missing value raises
``InputError`` naming the key and the file (or "command line") it came from, before anything runs.

Every dataclass is frozen (hashable where its fields are): a stage's section (``SFTConfig``,
``HybridConfig``, ``DPOConfig``) is that stage's static spec, part of the compiled program. Change a
config with ``dataclasses.replace``.

``EvalConfig`` is the one description of a multi-round evaluation: a run's ``eval:`` section, the
defaults of ``distfair eval RUN key=value ...`` (``load_eval_config``), and what ``evaluate`` takes.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import yaml
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from distfair_jax.errors import InputError

__all__ = [
    "Stage", "DType", "Remat", "PromptFormat", "SFTAverage", "Ablation", "Reference", "Layout",
    "Optimizer", "Schedule", "Version", "Steering", "JudgeKind", "Parser", "KLPairs",
    "Config", "MeshConfig", "ModelConfig", "LoraConfig", "DataConfig", "OptimConfig", "SFTConfig",
    "HybridConfig", "DPOConfig", "CheckpointConfig", "HeldoutConfig", "LoggingConfig",
    "DecodeConfig", "JudgeConfig", "EvalConfig", "load_config", "load_eval_config",
    "config_to_yaml", "config_to_dict", "config_from_dict", "results_affecting",
    "with_absolute_paths", "absolute_path", "PATH_FIELDS",
]


# ------------------------------------------------------------------------------------------------
# Choices. Member names equal their values: OmegaConf reads enums from YAML by name.


Stage = enum.StrEnum("Stage", ["sft", "hybrid", "ift", "dpo"], module=__name__)
DType = enum.StrEnum("DType", ["float32", "bfloat16"], module=__name__)
Remat = enum.StrEnum("Remat", ["none", "full", "dots"], module=__name__)
PromptFormat = enum.StrEnum("PromptFormat", ["chat", "reference"], module=__name__)
SFTAverage = enum.StrEnum("SFTAverage", ["sequence", "token"], module=__name__)
Ablation = enum.StrEnum("Ablation", ["full", "kl_only", "kto_only"], module=__name__)
Reference = enum.StrEnum("Reference", ["online", "cached", "auto"], module=__name__)
Layout = enum.StrEnum("Layout", ["auto", "packed", "rows"], module=__name__)
Optimizer = enum.StrEnum("Optimizer", ["adamw", "rmsprop", "sgd"], module=__name__)
Schedule = enum.StrEnum("Schedule", ["constant", "cosine"], module=__name__)
Version = enum.StrEnum("Version", ["v1", "v2", "v3"], module=__name__)
Steering = enum.StrEnum("Steering", ["model", "target", "none"], module=__name__)
JudgeKind = enum.StrEnum("JudgeKind", ["rules", "openai"], module=__name__)
KLPairs = enum.StrEnum("KLPairs", ["shifted", "reference"], module=__name__)
Parser = enum.StrEnum("Parser", ["reference", "synonyms"], module=__name__)


# ------------------------------------------------------------------------------------------------
# Range rules


def _get(cfg: Any, key: str) -> Any:
  for part in key.split("."):
    cfg = getattr(cfg, part)
  return cfg


def _check(cfg: Any, where: str = "") -> None:
  """Raises InputError for the first rule of ``cfg`` (a dataclass, or an OmegaConf node of one)
  that fails, naming the key below ``where``."""
  for key, ok, expected in type(cfg)._rules(cfg) if not isinstance(cfg, DictConfig) else \
      OmegaConf.get_type(cfg)._rules(cfg):
    if not ok:
      value = _get(cfg, key)
      value = list(value) if isinstance(value, ListConfig) else value
      raise InputError(f"{where}{key}: expected {expected}, got {value!r}")


class _Checked:
  """Dataclasses with range rules (``_rules``) check them when constructed."""

  def __post_init__(self):
    _check(self)



# ------------------------------------------------------------------------------------------------
# Schemas


@dataclass(frozen=True)
class MeshConfig:
  """Device mesh: sizes of the (data, fsdp, tensor) axes; -1 fills with the remaining devices."""
  data: int = -1
  fsdp: int = 1
  tensor: int = 1


@dataclass(frozen=True)
class ModelConfig:
  """Which model to train. ``checkpoint`` (a directory from ``distfair convert hf-to-flax``) wins
  over ``preset``; a preset without checkpoint starts from random weights, or from ``params`` (an
  orbax params directory, e.g. another run's ``<stage>/final/params``)."""
  preset: str = "tiny"
  overrides: Dict[str, Any] = field(default_factory=dict)
  checkpoint: Optional[str] = None
  params: Optional[str] = None
  tokenizer: Optional[str] = None
  dtype: DType = DType.float32
  param_dtype: DType = DType.float32
  remat: Remat = Remat.none
  scan_layers: bool = False


@dataclass(frozen=True)
class LoraConfig:
  """Low-rank adapters (the paper: q and v projections, alpha 16, rank 8-32, dropout 0.05)."""
  enabled: bool = False
  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  targets: List[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclass(frozen=True)
class DataConfig:
  """Dataset built in memory by ``distfair_jax.data`` (or read from ``records_dir``).

  ``system_prompt`` (``default`` | ``none`` | the text of a system message) and
  ``chat_template_kwargs`` (template variables, e.g. ``{date_string: "26 Jul 2024"}``) shape every
  prompt of the run, in training and in evaluation alike (``data.chat``)."""
  dataset: str = "gender_real_us"
  spec: Optional[str] = None
  records_dir: Optional[str] = None
  rows_per_occupation: int = 100
  heldout_fraction: float = 0.1
  max_length: int = 1024
  max_prompt_length: int = 512
  prompt_format: PromptFormat = PromptFormat.chat
  system_prompt: str = "default"
  chat_template_kwargs: Dict[str, Any] = field(default_factory=dict)
  stories: bool = False
  story_rows_per_occupation: Optional[int] = None
  seed: int = 0


@dataclass(frozen=True)
class OptimConfig:
  """optax optimizer and schedule."""
  optimizer: Optimizer = Optimizer.adamw
  learning_rate: float = 1e-5
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.01
  schedule: Schedule = Schedule.constant
  warmup_steps: int = 150
  clip_norm: float = 1.0
  grad_accum: int = 1


@dataclass(frozen=True)
class SFTConfig:
  """Stage 1: supervised fine-tuning on the desirable records (also the IFT baseline)."""
  epochs: int = 2
  batch_size: int = 4
  max_steps: int = 0
  group_by_length: bool = False
  average: SFTAverage = SFTAverage.sequence
  optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass(frozen=True)
class HybridConfig:
  """Stage 2: KTO + steering-token KL, reference = the stage-1 model.

  kl_pairs: the mismatched pairs of KTO's reference point z0. ``shifted`` (default): row i's
  prompt with the completion of row i + 1 of the [desirables; undesirables] batch, never its own
  pair's. ``reference``: the original's interleaved batches [d0, u0, d1, u1, ...] shifted by one,
  so each desirable row is paired with its own prompt's undesirable completion and each
  undesirable row with the next pair's desirable completion.

  reference: where the frozen reference model's log-probs come from. ``online``: its forward in
  every step. ``cached``: computed before the stage, once per distinct sequence of the whole stage
  (``train.reference_cache``: every target recurs each epoch, and the method's data repeats its
  (wording, answer) pairs), for either layout. ``auto`` (default): cached where that costs at most
  ``CACHE_PAYS_BELOW`` (90%) of the steps' own reference passes (the distinct share of the
  stage's sequences against 1 on the rows layout, against the packed / rows compute ratio on the
  packed layout), online otherwise; the choice is logged.
  """
  epochs: int = 3
  batch_size: int = 8
  max_steps: int = 0
  beta: float = 0.1
  desirable_weight: float = 1.0
  undesirable_weight: float = 1.0
  kl_weight: float = 1.0
  ablation: Ablation = Ablation.full
  renormalize: bool = False
  reference: Reference = Reference.auto
  layout: Layout = Layout.auto
  kl_pairs: KLPairs = KLPairs.shifted
  group_by_length: bool = False
  optim: OptimConfig = field(default_factory=lambda: OptimConfig(learning_rate=1e-6))


@dataclass(frozen=True)
class DPOConfig:
  """The DPO baseline (started from the IFT model)."""
  epochs: int = 3
  batch_size: int = 4
  max_steps: int = 0
  beta: float = 0.1
  label_smoothing: float = 0.0
  ipo: bool = False
  layout: Layout = Layout.auto
  group_by_length: bool = False
  optim: OptimConfig = field(default_factory=lambda: OptimConfig(learning_rate=1e-6))


@dataclass(frozen=True)
class CheckpointConfig:
  """orbax checkpointing: every ``every_steps`` steps (0: only at the end of a stage)."""
  every_steps: int = 0
  keep: int = 2
  async_save: bool = True


@dataclass(frozen=True)
class HeldoutConfig:
  """Held-out evaluation during training (the stage's losses and the exact steering MAE)."""
  every_steps: int = 0
  max_batches: int = 8


@dataclass(frozen=True)
class LoggingConfig:
  every_steps: int = 1
  tensorboard: bool = True
  progress: bool = True


@dataclass(frozen=True)
class DecodeConfig(_Checked):
  """One decoding configuration, shared by every method compared (recorded in the outputs).

  ``temperature`` 0 or ``greedy`` means argmax decoding. ``top_k`` 0 and ``top_p`` 1.0 disable those
  filters. ``max_new_tokens`` bounds attribute answers (v1, v2); ``story_max_new_tokens`` bounds stories
  (v3). Neither counts the steering token.
  """
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  greedy: bool = False
  max_new_tokens: int = 16
  story_max_new_tokens: int = 96

  def _rules(self):
    return [("temperature", self.temperature >= 0 and math.isfinite(self.temperature),
             "a number >= 0"),
            ("top_p", 0.0 < self.top_p <= 1.0, "a number in (0, 1]"),
            ("top_k", self.top_k >= 0, "an integer >= 0"),
            ("max_new_tokens", self.max_new_tokens >= 1, "an integer >= 1"),
            ("story_max_new_tokens", self.story_max_new_tokens >= 1, "an integer >= 1")]

  @property
  def is_greedy(self) -> bool:
    return self.greedy or self.temperature == 0


@dataclass(frozen=True)
class JudgeConfig:
  """The v3 story judge: ``rules`` (offline lexicons) or an OpenAI-compatible server."""
  kind: JudgeKind = JudgeKind.rules
  url: Optional[str] = None
  model: Optional[str] = None
  api_key_env: str = "OPENAI_API_KEY"
  timeout: float = 60.0
  workers: int = 8


@dataclass(frozen=True)
class EvalConfig(_Checked):
  """A multi-round evaluation (recorded in eval/metrics.json).

  rounds: samples per occupation per version (None: as many as the test set has records).
  steering: model | target | none. prompt_engineering: the target stated in the prompt (the
  baseline's wording). batch_size: about how many rows are decoded together. dataset: what to test
  on (default: the run's own dataset). dtype: a converted model's compute and parameter dtype
  (default: as stored; a run keeps its training dtypes). parser: how v1/v2 answers become
  categories: ``reference`` (the paper's rule: the category name mentioned last, on word
  boundaries) or ``synonyms`` (the attribute's synonyms count as mentions too). exact_answers:
  also score v1/v2 by the exact probabilities of the K canonical answers (one forward per
  prompt, answer and steering token: noise-free, with the mass on non-answers).
  system_prompt, chat_template_kwargs: the prompts' system message and template variables
  (``data.chat``; default: a run's own ``data.system_prompt`` / ``data.chat_template_kwargs``, so
  that it is evaluated on the prompts it was trained on; a converted model: ``default`` and none).
  """
  versions: List[Version] = field(default_factory=lambda: [Version.v1, Version.v2, Version.v3])
  rounds: Optional[int] = 100
  steering: Steering = Steering.model
  prompt_engineering: bool = False
  dataset: Optional[str] = None
  decode: DecodeConfig = field(default_factory=DecodeConfig)
  judge: JudgeConfig = field(default_factory=JudgeConfig)
  batch_size: int = 256
  seed: int = 0
  n_bootstrap: int = 1000
  plots: bool = True
  dtype: Optional[DType] = None
  parser: Parser = Parser.reference
  exact_answers: bool = True
  system_prompt: Optional[str] = None
  chat_template_kwargs: Optional[Dict[str, Any]] = None

  def _rules(self):
    versions = [str(v) for v in self.versions]
    return [("versions", 0 < len(versions) and set(versions) <= {v.value for v in Version},
             "a non-empty subset of v1, v2, v3"),
            ("steering", str(self.steering) in {s.value for s in Steering},
             "one of model, target, none"),
            ("rounds", self.rounds is None or self.rounds >= 1, "an integer >= 1"),
            ("batch_size", self.batch_size >= 1, "an integer >= 1"),
            ("n_bootstrap", self.n_bootstrap >= 0, "an integer >= 0"),
            ("parser", str(self.parser) in {p.value for p in Parser}, "one of reference, synonyms")]

  @property
  def prompt_field(self) -> str:
    """The test records' field that holds the prompt."""
    return "pe_prompt" if self.prompt_engineering else "prompt"


@dataclass(frozen=True)
class Config(_Checked):
  """The whole run. ``stages`` lists what ``distfair train`` runs, in order: sft, hybrid, ift, dpo."""
  run_dir: str = MISSING
  seed: int = 0
  stages: List[Stage] = field(default_factory=lambda: [Stage.sft, Stage.hybrid])
  mesh: MeshConfig = field(default_factory=MeshConfig)
  model: ModelConfig = field(default_factory=ModelConfig)
  lora: LoraConfig = field(default_factory=LoraConfig)
  data: DataConfig = field(default_factory=DataConfig)
  sft: SFTConfig = field(default_factory=SFTConfig)
  hybrid: HybridConfig = field(default_factory=HybridConfig)
  dpo: DPOConfig = field(default_factory=DPOConfig)
  checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
  heldout: HeldoutConfig = field(default_factory=HeldoutConfig)
  logging: LoggingConfig = field(default_factory=LoggingConfig)
  eval: EvalConfig = field(default_factory=EvalConfig)

  def _rules(self):
    rules = [("stages", len(self.stages) > 0, "at least one of sft, hybrid, ift, dpo")]
    rules += [(key, _get(self, key) >= 1, "a positive integer")
              for key in ("sft.batch_size", "hybrid.batch_size", "dpo.batch_size", "lora.rank")]
    b = self.hybrid.batch_size
    rules.append(("hybrid.batch_size", b >= 2 and b % 2 == 0,
                  "an even number >= 2 (each row's desirable and undesirable examples sit side by "
                  "side, and the KTO reference point needs mismatched pairs from other rows)"))
    return rules


# ------------------------------------------------------------------------------------------------
# Loading


def _first_line(message: str) -> str:
  return str(message).strip().splitlines()[0] if str(message).strip() else "invalid value"


def _read_yaml(path: str) -> dict:
  from distfair_jax import fileio  # pylint: disable=g-import-not-at-top
  fileio.check_not_lfs_pointer(path)
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


_ENUM_ERROR = re.compile(r"Invalid value '(?P<got>.*)', expected one of \[(?P<names>.*)\]")


def _merge(base, layer, source: str):
  try:
    return OmegaConf.merge(base, layer)
  except OmegaConfBaseException as e:
    key = getattr(e, "full_key", None) or "?"
    msg = _first_line(getattr(e, "msg", None) or str(e))
    m = _ENUM_ERROR.match(msg)
    if m:  # an enum: say it as every other check does
      msg = f"expected one of {m.group('names')}, got {m.group('got')!r}"
    raise InputError(f"{source}: {key}: {msg}") from None


def _dotlist(overrides: Sequence[str]):
  for item in overrides:
    if "=" not in item:
      raise InputError(f"command line: {item!r}: expected key=value")
  try:
    return OmegaConf.from_dotlist(list(overrides))
  except OmegaConfBaseException as e:
    raise InputError(f"command line: {_first_line(e)}") from None


def _check_tree(node, source: str, path: str = "") -> None:
  """The range rules of every checked section of an OmegaConf tree, with the keys' full paths."""
  if hasattr(OmegaConf.get_type(node), "_rules"):
    try:
      _check(node, f"{path}." if path else "")
    except InputError as e:
      raise InputError(f"{source}: {e}") from None
  for key in node:
    child = node._get_node(key)  # noqa: SLF001
    if isinstance(child, DictConfig):
      _check_tree(child, source, f"{path}.{key}" if path else str(key))


def _to_object(cfg, source: str):
  """The checked dataclass of a merged OmegaConf node; errors name ``source`` and the key."""
  missing = sorted(OmegaConf.missing_keys(cfg))
  if missing:
    raise InputError(f"{source}: {missing[0]}: missing value (set it in the file or as "
                     f"{missing[0]}=... on the command line)")
  _check_tree(cfg, source)
  return OmegaConf.to_object(cfg)


def load_config(path: Optional[str] = None, overrides: Optional[Sequence[str]] = None) -> Config:
  """Compose ``path`` (and its defaults) with ``key=value`` overrides into a checked ``Config``."""
  cfg = OmegaConf.structured(Config)
  last_source = "defaults"
  if path is not None:
    for source, data in _layers(path):
      cfg = _merge(cfg, data, source)
      last_source = source
  if overrides:
    cfg = _merge(cfg, _dotlist(overrides), "command line")
    last_source = "command line"
  return _to_object(cfg, last_source)


def load_eval_config(base: EvalConfig | None = None,
                     overrides: Optional[Sequence[str]] = None) -> EvalConfig:
  """``base`` (default: the defaults) with ``key=value`` overrides of its fields
  (``rounds=50 decode.temperature=0.7 versions=[v2]``), checked like a config file."""
  cfg = OmegaConf.structured(base if base is not None else EvalConfig)
  if overrides:
    cfg = _merge(cfg, _dotlist(overrides), "command line")
  return _to_object(cfg, "command line" if overrides else "eval config")


def _plain(value: Any) -> Any:
  if isinstance(value, enum.Enum):
    return value.value
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  return value


def config_to_dict(cfg: Any) -> dict[str, Any]:
  """A config dataclass as plain YAML / JSON types (enums as their values)."""
  return _plain(dataclasses.asdict(cfg))


def config_from_dict(data: dict[str, Any], source: str = "config") -> Config:
  """The inverse of ``config_to_dict``, checked like a file (used to read a run's saved config)."""
  return _to_object(_merge(OmegaConf.structured(Config), data, source), source)


def config_to_yaml(cfg: Config) -> str:
  return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


PATH_FIELDS: tuple[str, ...] = ("run_dir", "model.checkpoint", "model.params", "model.tokenizer",
                                 "data.spec", "data.records_dir")


def absolute_path(value: Optional[str]) -> Optional[str]:
  """A local path made absolute (``~`` expanded) against the working directory; URLs and empty
  values unchanged."""
  if not value or "://" in value:
    return value
  return os.path.abspath(os.path.expanduser(value))


def with_absolute_paths(cfg: Config) -> Config:
  """``cfg`` with every local path (``PATH_FIELDS``) made absolute against the working directory,
  as a run records them: ``distfair eval`` / ``export`` then find the run's checkpoint, tokenizer and
  dataset from any directory. URLs (``gs://...``) stay as they are."""
  sections = {}
  for key in PATH_FIELDS:
    if "." not in key:
      continue
    section, name = key.split(".")
    sections.setdefault(section, {})[name] = absolute_path(getattr(getattr(cfg, section), name))
  return dataclasses.replace(
      cfg, run_dir=absolute_path(cfg.run_dir),
      **{s: dataclasses.replace(getattr(cfg, s), **fields) for s, fields in sections.items()})


_STAGE_SECTION = {"sft": "sft", "ift": "sft", "hybrid": "hybrid", "dpo": "dpo"}


def results_affecting(cfg_dict: dict) -> dict:
  """The parts of a config dict that change a run's trained weights (not where it lives, how it
  logs, checkpoints or evaluates, nor the sections of stages it does not run): what a rerun in
  the same run directory must match."""
  run = {_STAGE_SECTION.get(str(s), str(s)) for s in cfg_dict.get("stages") or ()}
  d = {k: v for k, v in cfg_dict.items()
       if k not in ("logging", "checkpoint", "run_dir", "eval")
       and not (k in _STAGE_SECTION.values() and k not in run)}
  if "heldout" in d:
    d["heldout"] = {k: v for k, v in d["heldout"].items() if k != "every_steps"}
  return d
