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
import numbers
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

import yaml
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from distfair_jax.errors import InputError

__all__ = [
    "Stage", "DType", "Remat", "PromptFormat", "LengthBuckets", "SteeringPlacement", "SFTAverage",
    "Ablation", "Reference", "Layout",
    "Optimizer", "Schedule", "Version", "Steering", "JudgeKind", "Parser", "KLPairs",
    "Config", "MeshConfig", "ModelConfig", "LoraConfig", "DataConfig", "OptimConfig", "SFTConfig",
    "HybridConfig", "DPOConfig", "CheckpointConfig", "HeldoutConfig", "LoggingConfig",
    "DecodeConfig", "JudgeConfig", "EvalConfig", "load_config", "load_eval_config",
    "config_to_yaml", "config_to_dict", "config_from_dict", "results_affecting",
    "with_absolute_paths", "absolute_path", "PATH_FIELDS",
]


# ------------------------------------------------------------------------------------------------
# Choices. Member names equal their values: OmegaConf reads enums from YAML by name.


# The training stages, the one list of their names: each is one class of ``train.stages``
# (``STAGE_CLASSES``, checked against this list when it is imported), named by its member here.
Stage = enum.StrEnum("Stage", ["sft", "hybrid", "ift", "dpo"], module=__name__)
DType = enum.StrEnum("DType", ["float32", "bfloat16"], module=__name__)
Remat = enum.StrEnum("Remat", ["none", "full", "dots"], module=__name__)
PromptFormat = enum.StrEnum("PromptFormat", ["chat", "reference"], module=__name__)
# Padded lengths of training batches (``data.tokenize.bucket_lengths``): powers of two, or those
# and 1.5 times each (less padding, one more compiled step shape per octave).
LengthBuckets = enum.StrEnum("LengthBuckets", ["pow2", "fine"], module=__name__)
# Where a steered sequence's steering token goes (``data.tokenize``): the first assistant token
# (ours), or the end of the user turn's content (the original code's).
SteeringPlacement = enum.StrEnum("SteeringPlacement", ["assistant", "user_turn"], module=__name__)
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
#
# A numeric field declares its range once, next to it: ``lr: float = _ranged(1e-5, POSITIVE)`` (a
# ``dataclasses.field`` whose metadata holds a ``Range``). ``_rules`` of a section adds the rules
# that tie fields together or check choices given as plain strings. Both are checked when a
# config is loaded (``_check_tree``: before anything runs, naming the file or "command line" that
# set the key) and when a section is constructed in code (``_Checked``).


def _number(x: float) -> str:
  return "2**32" if x == 2**32 else f"{x:g}"


@dataclass(frozen=True)
class Range:
  """The values a numeric field takes: within [low, high] (either bound open or absent), an integer
  where ``integer``, finite always; ``also``: values allowed besides (``-1`` of a mesh axis);
  ``none``: None allowed (an optional field)."""
  low: Optional[float] = None
  high: Optional[float] = None
  low_open: bool = False
  high_open: bool = False
  integer: bool = False
  also: tuple = ()
  none: bool = False

  def ok(self, value: Any) -> bool:
    if value is None:
      return self.none
    if isinstance(value, bool):
      return False
    if value in self.also:
      return True
    kind = numbers.Integral if self.integer else numbers.Real
    if not isinstance(value, kind) or not math.isfinite(value):
      return False
    if self.low is not None and (value <= self.low if self.low_open else value < self.low):
      return False
    return self.high is None or (value < self.high if self.high_open else value <= self.high)

  def __str__(self) -> str:
    what = "an integer" if self.integer else "a number" if self.high is not None else \
        "a finite number"
    if self.low is not None and self.high is not None:
      text = (f"{what} in {'(' if self.low_open else '['}{_number(self.low)}, "
              f"{_number(self.high)}{')' if self.high_open else ']'}")
    elif self.low is not None:
      text = f"{what} {'>' if self.low_open else '>='} {_number(self.low)}"
    elif self.high is not None:
      text = f"{what} {'<' if self.high_open else '<='} {_number(self.high)}"
    else:
      text = what
    text += "".join(f", or {a}" for a in self.also)
    return text + (", or null" if self.none else "")


COUNT = Range(low=1, integer=True)                 # batch sizes, epochs, grad_accum, keep, ...
COUNT_OR_ZERO = Range(low=0, integer=True)         # steps where 0 means "off" / "all"
POSITIVE = Range(low=0, low_open=True)             # learning rates, beta, timeouts
NON_NEGATIVE = Range(low=0)                        # weights, weight decay, clip norm
FRACTION = Range(low=0, high=1, high_open=True)    # a share held out
PROBABILITY = Range(low=0, high=1)                 # dropout
SEED = Range(low=0, high=2**32, high_open=True, integer=True)  # what jax and grain take
MESH_AXIS = Range(low=1, integer=True, also=(-1,))


def _ranged(default: Any, rng: Range) -> Any:
  """A dataclass field with ``default`` whose values must lie in ``rng``."""
  return field(default=default, metadata={"range": rng})


def _get(cfg: Any, key: str) -> Any:
  for part in key.split("."):
    cfg = getattr(cfg, part)
  return cfg


def _schema(cfg: Any) -> type:
  return OmegaConf.get_type(cfg) if isinstance(cfg, DictConfig) else type(cfg)


def _all_rules(cfg: Any) -> list[tuple[str, bool, str]]:
  """(key, ok, expected) of every rule of one section: its fields' ranges, then its ``_rules``."""
  cls = _schema(cfg)
  rules = [(f.name, f.metadata["range"].ok(getattr(cfg, f.name)), str(f.metadata["range"]))
           for f in dataclasses.fields(cls) if "range" in f.metadata]
  return rules + (list(cls._rules(cfg)) if hasattr(cls, "_rules") else [])


def _check(cfg: Any, where: str = "") -> None:
  """Raises InputError for the first rule of ``cfg`` (a dataclass, or an OmegaConf node of one)
  that fails, naming the key below ``where``."""
  for key, ok, expected in _all_rules(cfg):
    if not ok:
      value = _get(cfg, key)
      value = list(value) if isinstance(value, ListConfig) else value
      raise InputError(f"{where}{key}: expected {expected}, got {value!r}")


class _Checked:
  """Dataclasses with range rules check them when constructed."""

  def __post_init__(self):
    _check(self)


# ------------------------------------------------------------------------------------------------
# Schemas


@dataclass(frozen=True)
class MeshConfig(_Checked):
  """Device mesh: sizes of the (data, fsdp, tensor) axes; -1 fills with the remaining devices."""
  data: int = _ranged(-1, MESH_AXIS)
  fsdp: int = _ranged(1, MESH_AXIS)
  tensor: int = _ranged(1, MESH_AXIS)


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
class LoraConfig(_Checked):
  """Low-rank adapters (the paper: q and v projections, alpha 16, rank 8-32, dropout 0.05).

  ``targets``: projection names of the family (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj,
  down_proj) or ``all-linear`` (PEFT's convention: every one of them; a bare string is a list of
  one)."""
  enabled: bool = False
  rank: int = _ranged(8, COUNT)
  alpha: float = _ranged(16.0, POSITIVE)
  dropout: float = _ranged(0.0, PROBABILITY)
  targets: List[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclass(frozen=True)
class DataConfig(_Checked):
  """Dataset built in memory by ``distfair_jax.data`` (or read from ``records_dir``).

  ``system_prompt`` (``default`` | ``none`` | the text of a system message) and
  ``chat_template_kwargs`` (template variables, e.g. ``{date_string: "26 Jul 2024"}``) shape every
  prompt of the run, in training and in evaluation alike (``data.chat``).

  ``pair_story_rows_per_occupation``: how many of the story rows also become pairs (stage 2's KTO
  pairs, DPO's preference pairs); null: all. A story pair packs the prompt and four ~60-token
  stories, about eight times an answer pair's compute: stage 2 has only to keep the stories SFT
  taught, not teach them. At least 3 (as many as the story wordings, or all story rows) keeps
  every story prompt in the pair records, so their held-out split is SFT's.
  ``length_buckets``: the padded lengths of training batches (``pow2`` | ``fine``).
  ``steering_placement``: ``assistant`` (the steering token opens the answer) | ``user_turn``
  (it ends the user turn's content, as in the original code; evaluation reads it from the run)."""
  dataset: str = "gender_real_us"
  spec: Optional[str] = None
  records_dir: Optional[str] = None
  rows_per_occupation: int = _ranged(100, COUNT)
  heldout_fraction: float = _ranged(0.1, FRACTION)
  max_length: int = _ranged(1024, COUNT)
  max_prompt_length: int = _ranged(512, COUNT)
  prompt_format: PromptFormat = PromptFormat.chat
  system_prompt: str = "default"
  chat_template_kwargs: Dict[str, Any] = field(default_factory=dict)
  stories: bool = False
  story_rows_per_occupation: Optional[int] = _ranged(None, dataclasses.replace(COUNT, none=True))
  pair_story_rows_per_occupation: Optional[int] = _ranged(
      None, dataclasses.replace(COUNT, none=True))
  length_buckets: LengthBuckets = LengthBuckets.pow2
  steering_placement: SteeringPlacement = SteeringPlacement.assistant
  seed: int = _ranged(0, SEED)


@dataclass(frozen=True)
class OptimConfig(_Checked):
  """optax optimizer and schedule (``clip_norm`` 0: no clipping)."""
  optimizer: Optimizer = Optimizer.adamw
  learning_rate: float = _ranged(1e-5, POSITIVE)
  b1: float = _ranged(0.9, FRACTION)
  b2: float = _ranged(0.999, FRACTION)
  eps: float = _ranged(1e-8, NON_NEGATIVE)
  weight_decay: float = _ranged(0.01, NON_NEGATIVE)
  schedule: Schedule = Schedule.constant
  warmup_steps: int = _ranged(150, COUNT_OR_ZERO)
  clip_norm: float = _ranged(1.0, NON_NEGATIVE)
  grad_accum: int = _ranged(1, COUNT)


@dataclass(frozen=True)
class SFTConfig(_Checked):
  """Stage 1: supervised fine-tuning on the desirable records (also the IFT baseline).
  ``max_steps`` 0: every step of ``epochs``."""
  epochs: int = _ranged(2, COUNT)
  batch_size: int = _ranged(4, COUNT)
  max_steps: int = _ranged(0, COUNT_OR_ZERO)
  group_by_length: bool = False
  average: SFTAverage = SFTAverage.sequence
  optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass(frozen=True)
class HybridConfig(_Checked):
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

  nll_weight: weight of a term the paper does not have, the desirable completions' negative
  log-likelihood per token (``losses.desirable_nll``), which keeps their prose likely while KTO
  pushes the undesirable completions down; 0 (default) is the paper's objective.
  """
  epochs: int = _ranged(3, COUNT)
  batch_size: int = _ranged(8, COUNT)
  max_steps: int = _ranged(0, COUNT_OR_ZERO)
  beta: float = _ranged(0.1, POSITIVE)
  desirable_weight: float = _ranged(1.0, NON_NEGATIVE)
  undesirable_weight: float = _ranged(1.0, NON_NEGATIVE)
  kl_weight: float = _ranged(1.0, NON_NEGATIVE)
  nll_weight: float = _ranged(0.0, NON_NEGATIVE)
  ablation: Ablation = Ablation.full
  renormalize: bool = False
  reference: Reference = Reference.auto
  layout: Layout = Layout.auto
  kl_pairs: KLPairs = KLPairs.shifted
  group_by_length: bool = False
  optim: OptimConfig = field(default_factory=lambda: OptimConfig(learning_rate=1e-6))

  def _rules(self):
    b = self.batch_size
    return [("batch_size", b >= 2 and b % 2 == 0,
             "an even number >= 2 (each row's desirable and undesirable examples sit side by "
             "side, and the KTO reference point needs mismatched pairs from other rows)")]


@dataclass(frozen=True)
class DPOConfig(_Checked):
  """The DPO baseline (started from the IFT model). ``label_smoothing``: conservative DPO's
  share of flipped preference labels."""
  epochs: int = _ranged(3, COUNT)
  batch_size: int = _ranged(4, COUNT)
  max_steps: int = _ranged(0, COUNT_OR_ZERO)
  beta: float = _ranged(0.1, POSITIVE)
  label_smoothing: float = _ranged(0.0, Range(low=0, high=0.5, high_open=True))
  ipo: bool = False
  layout: Layout = Layout.auto
  group_by_length: bool = False
  optim: OptimConfig = field(default_factory=lambda: OptimConfig(learning_rate=1e-6))


@dataclass(frozen=True)
class CheckpointConfig(_Checked):
  """orbax checkpointing: every ``every_steps`` steps (0: only at the end of a stage)."""
  every_steps: int = _ranged(0, COUNT_OR_ZERO)
  keep: int = _ranged(2, COUNT)
  async_save: bool = True


@dataclass(frozen=True)
class HeldoutConfig(_Checked):
  """Held-out evaluation during training (the stage's losses and the exact steering MAE):
  every ``every_steps`` steps (0: at the end of a stage only) on at most ``max_batches``
  batches (0: none)."""
  every_steps: int = _ranged(0, COUNT_OR_ZERO)
  max_batches: int = _ranged(8, COUNT_OR_ZERO)


@dataclass(frozen=True)
class LoggingConfig(_Checked):
  every_steps: int = _ranged(1, COUNT)
  tensorboard: bool = True
  progress: bool = True


@dataclass(frozen=True)
class DecodeConfig(_Checked):
  """One decoding configuration, shared by every method compared (recorded in the outputs).

  ``temperature`` 0 or ``greedy`` means argmax decoding. ``top_k`` 0 and ``top_p`` 1.0 disable those
  filters. ``max_new_tokens`` bounds attribute answers (v1, v2); ``story_max_new_tokens`` bounds stories
  (v3). Neither counts the steering token.
  """
  temperature: float = _ranged(1.0, NON_NEGATIVE)
  top_p: float = _ranged(1.0, Range(low=0, high=1, low_open=True))
  top_k: int = _ranged(0, COUNT_OR_ZERO)
  greedy: bool = False
  max_new_tokens: int = _ranged(16, COUNT)
  story_max_new_tokens: int = _ranged(96, COUNT)

  @property
  def is_greedy(self) -> bool:
    return self.greedy or self.temperature == 0


@dataclass(frozen=True)
class JudgeConfig(_Checked):
  """The v3 story judge: ``rules`` (offline lexicons) or an OpenAI-compatible server."""
  kind: JudgeKind = JudgeKind.rules
  url: Optional[str] = None
  model: Optional[str] = None
  api_key_env: str = "OPENAI_API_KEY"
  timeout: float = _ranged(60.0, POSITIVE)
  workers: int = _ranged(8, COUNT)

  def _rules(self):
    server = str(self.kind) == JudgeKind.openai.value
    return [("model", not server or bool(self.model),
             "the served model name for judge.kind=openai (judge.model=NAME)"),
            ("url", not server or bool(self.url),
             "the server's URL for judge.kind=openai (judge.url=http://HOST:PORT/v1)")]


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
  rounds: Optional[int] = _ranged(100, dataclasses.replace(COUNT, none=True))
  steering: Steering = Steering.model
  prompt_engineering: bool = False
  dataset: Optional[str] = None
  decode: DecodeConfig = field(default_factory=DecodeConfig)
  judge: JudgeConfig = field(default_factory=JudgeConfig)
  batch_size: int = _ranged(256, COUNT)
  seed: int = _ranged(0, SEED)
  n_bootstrap: int = _ranged(1000, COUNT_OR_ZERO)
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
            ("parser", str(self.parser) in {p.value for p in Parser}, "one of reference, synonyms")]

  @property
  def prompt_field(self) -> str:
    """The test records' field that holds the prompt."""
    return "pe_prompt" if self.prompt_engineering else "prompt"


@dataclass(frozen=True)
class Config(_Checked):
  """The whole run. ``stages`` lists what ``distfair train`` runs, in order: sft, hybrid, ift, dpo."""
  run_dir: str = MISSING
  seed: int = _ranged(0, SEED)
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
    return [("stages", len(self.stages) > 0, f"at least one of {', '.join(Stage)}")]


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


# List fields that also take one string, as their libraries do (PEFT's ``target_modules:
# all-linear``): ``lora.targets: all-linear`` is ``lora.targets: [all-linear]``.
_LIST_OR_STRING = (("lora", "targets"),)


def _lists_from_strings(layer):
  """``layer`` (a mapping or an OmegaConf node) with a string under a ``_LIST_OR_STRING`` key
  made a one-element list."""
  for section, key in _LIST_OR_STRING:
    node = layer.get(section) if hasattr(layer, "get") else None
    if hasattr(node, "get") and isinstance(node.get(key), str):
      if isinstance(layer, DictConfig):
        layer = OmegaConf.to_container(layer)
      layer = {**layer, section: {**layer[section], key: [layer[section][key]]}}
  return layer


def _merge(base, layer, source: str):
  layer = _lists_from_strings(layer)
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


def _sets(layer: Any, key: str) -> bool:
  """Whether ``layer`` (a mapping or an OmegaConf node) holds the dotted ``key``."""
  for part in key.split("."):
    if not hasattr(layer, "get") or part not in layer:
      return False
    layer = layer[part]
  return True


def _source_of(key: str, layers: Sequence[tuple[str, Any]], default: str) -> str:
  """The source of the last layer that sets ``key`` (a value that fails a rule came from it)."""
  return next((source for source, layer in reversed(layers) if _sets(layer, key)), default)


def _check_tree(node, layers: Sequence[tuple[str, Any]], default: str, path: str = "") -> None:
  """The rules of every section of an OmegaConf tree, with the keys' full paths; an error names
  the layer (file or "command line") that set the failing key."""
  cls = OmegaConf.get_type(node)
  if dataclasses.is_dataclass(cls):
    where = f"{path}." if path else ""
    for key, ok, expected in _all_rules(node):
      if not ok:
        value = _get(node, key)
        value = list(value) if isinstance(value, ListConfig) else value
        raise InputError(f"{_source_of(where + key, layers, default)}: {where}{key}: expected "
                         f"{expected}, got {value!r}")
  for key in node:
    child = node._get_node(key)  # noqa: SLF001
    if isinstance(child, DictConfig):
      _check_tree(child, layers, default, f"{path}.{key}" if path else str(key))


def _to_object(cfg, source: str, layers: Sequence[tuple[str, Any]] = ()):
  """The checked dataclass of a merged OmegaConf node; errors name the layer that set the key
  (``layers``: (source, mapping) in merge order), else ``source``."""
  missing = sorted(OmegaConf.missing_keys(cfg))
  if missing:
    raise InputError(f"{source}: {missing[0]}: missing value (set it in the file or as "
                     f"{missing[0]}=... on the command line)")
  _check_tree(cfg, layers, source)
  return OmegaConf.to_object(cfg)


def load_config(path: Optional[str] = None, overrides: Optional[Sequence[str]] = None) -> Config:
  """Compose ``path`` (and its defaults) with ``key=value`` overrides into a checked ``Config``."""
  cfg = OmegaConf.structured(Config)
  last_source = "defaults"
  layers: list[tuple[str, Any]] = []
  if path is not None:
    for source, data in _layers(path):
      cfg = _merge(cfg, data, source)
      layers.append((source, data))
      last_source = source
  if overrides:
    dotlist = _dotlist(overrides)
    cfg = _merge(cfg, dotlist, "command line")
    layers.append(("command line", dotlist))
    last_source = "command line"
  return _to_object(cfg, last_source, layers)


def load_eval_config(base: EvalConfig | None = None,
                     overrides: Optional[Sequence[str]] = None) -> EvalConfig:
  """``base`` (default: the defaults) with ``key=value`` overrides of its fields
  (``rounds=50 decode.temperature=0.7 versions=[v2]``), checked like a config file."""
  cfg = OmegaConf.structured(base if base is not None else EvalConfig)
  layers = [("command line", _dotlist(overrides))] if overrides else []
  for source, layer in layers:
    cfg = _merge(cfg, layer, source)
  return _to_object(cfg, "command line" if overrides else "eval config", layers)


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


def results_affecting(cfg_dict: dict, sections: Mapping[str, str]) -> dict:
  """The parts of a config dict that change a run's trained weights (not where it lives, how it
  logs, checkpoints or evaluates, nor the sections of stages it does not run): what a rerun in
  the same run directory must match. ``sections``: stage -> its config section (the stages'
  registry, ``train.stages.SECTIONS``)."""
  run = {sections.get(str(s), str(s)) for s in cfg_dict.get("stages") or ()}
  d = {k: v for k, v in cfg_dict.items()
       if k not in ("logging", "checkpoint", "run_dir", "eval")
       and not (k in sections.values() and k not in run)}
  if "heldout" in d:
    d["heldout"] = {k: v for k, v in d["heldout"].items() if k != "every_steps"}
  return d
