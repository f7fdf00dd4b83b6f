"""The Llama family's config (``LlamaConfig``: Hugging Face ``config.json`` field names, read
by ``LlamaConfig.from_hf`` and written by ``to_hf``) and the tables it checks against."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Mapping

import jax.numpy as jnp
import numpy as np

from distfair_jax.errors import InputError

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                 "Gemma2ForCausalLM": "gemma2", "Qwen3ForCausalLM": "qwen3",
                 "Gemma3ForCausalLM": "gemma3"}
# transformers' model_type where it differs from ours (Gemma 3's text-only config).
HF_MODEL_TYPES = {"gemma3": "gemma3_text"}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
REMAT_POLICIES = ("none", "full", "dots")
HIDDEN_ACTS = ("silu", "gelu_pytorch_tanh")  # SwiGLU, GeGLU (tanh-approximate gelu)
LAYER_TYPES = ("full_attention", "sliding_attention")
ROPE_TYPES = {
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "linear": ("factor",),
}
_REQUIRED_HF_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                       "num_attention_heads")
_HF_DEFAULTS = {  # Hugging Face's own defaults for optional fields, per model type
    "llama": {"max_position_embeddings": 2048},
    "qwen2": {"max_position_embeddings": 32768},
    "gemma2": {"max_position_embeddings": 8192, "tie_word_embeddings": True, "head_dim": 256,
               "num_key_value_heads": 4, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
               "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 256,
               "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
               "sliding_window": 4096},
    "qwen3": {"max_position_embeddings": 32768, "head_dim": 128},
    "gemma3": {"max_position_embeddings": 131072, "tie_word_embeddings": True, "head_dim": 256,
               "num_key_value_heads": 4, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
               "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 256,
               "sliding_window": 4096, "rope_theta": 1_000_000.0,
               "rope_local_base_freq": 10_000.0},
}


def sliding_layer_types(num_layers: int, pattern: int) -> tuple[str, ...]:
  """Every ``pattern``-th layer global, the others sliding-window (transformers' default
  ``layer_types`` of Gemma 2, pattern 2, and Gemma 3, pattern 6)."""
  return tuple("sliding_attention" if (i + 1) % pattern else "full_attention"
               for i in range(num_layers))


def gemma2_layer_types(num_layers: int) -> tuple[str, ...]:
  """transformers' default for Gemma 2: sliding-window layers first, then alternating."""
  return sliding_layer_types(num_layers, 2)


_DEFAULT_SLIDING_PATTERN = {"gemma2": 2, "gemma3": 6}  # layer_types when a config gives none


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------


def _normalize_rope_scaling(value: Any, source: str, field: str = "rope_scaling") -> dict | None:
  """Returns ``{"rope_type": ..., <numbers>}`` or None (no scaling); InputError on anything else."""
  if value is None:
    return None
  if not isinstance(value, Mapping):
    raise InputError(f"{source}: {field}: expected a mapping or null, got {value!r}")
  d = {k: v for k, v in value.items() if k not in ("rope_theta", "type", "partial_rotary_factor")}
  rope_type = value.get("rope_type", value.get("type", "default"))
  if value.get("partial_rotary_factor", 1.0) != 1.0:
    raise InputError(f"{source}: {field}.partial_rotary_factor: expected 1.0, "
                     f"got {value['partial_rotary_factor']!r}")
  if rope_type in (None, "default"):
    return None
  if rope_type not in ROPE_TYPES:
    raise InputError(f"{source}: {field}.rope_type: expected one of default, "
                     f"{', '.join(ROPE_TYPES)}, got {rope_type!r}")
  out: dict[str, Any] = {"rope_type": rope_type}
  for key in ROPE_TYPES[rope_type]:
    if key not in d or d[key] is None:
      raise InputError(f"{source}: {field}.{key}: expected a number for rope_type {rope_type}, "
                       f"got nothing")
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
      raise InputError(f"{source}: {field}.{key}: expected a positive number, got {v!r}")
    out[key] = int(v) if key == "original_max_position_embeddings" else float(v)
  return out


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Llama-family configuration; field names as in Hugging Face ``config.json``.

  ``num_key_value_heads`` defaults to ``num_attention_heads`` and ``head_dim`` to
  ``hidden_size // num_attention_heads``. ``rope_scaling`` is None or a dict
  ``{"rope_type": "llama3" | "linear", "factor": ..., ...}``. ``dtype`` is the compute dtype,
  ``param_dtype`` the storage dtype (``"float32"`` or ``"bfloat16"``); softmax and norms always run in
  float32. ``remat`` is the per-decoder-layer rematerialisation policy: none, full or dots.
  ``scan_layers``: the decoder layers' parameters stacked on a leading ``layers`` axis and run by
  one ``nnx.scan`` (one compiled layer, so compile time does not grow with depth) instead of a
  Python loop (one compiled copy per layer); see ``distfair_jax.model.layout``. Not a Hugging
  Face field: a run-time choice, like ``remat``. Same weights, same outputs; a random
  initialisation differs from the loop's (the layers draw from split keys).

  Gemma 2's fields (None / "silu": off): ``hidden_act`` (``silu`` SwiGLU or ``gelu_pytorch_tanh``
  GeGLU); ``query_pre_attn_scalar`` (attention scale ``s ** -0.5``, default ``head_dim``);
  ``attn_logit_softcapping`` / ``final_logit_softcapping`` (``c * tanh(x / c)`` on the attention
  scores / the output logits); ``sliding_window`` and ``layer_types`` (one of ``LAYER_TYPES`` per
  layer; a Gemma 2 config without it alternates, sliding first, as transformers does; Gemma 3's
  puts one global layer after five sliding ones). ``rope_local_base_freq`` (Gemma 3): the RoPE
  base of the sliding-window layers (``rope_theta`` and ``rope_scaling`` are then the global
  layers'); None: one RoPE for every layer. Qwen3 and Gemma 3 add RMSNorm on queries and keys
  per head (their attention modules; no config field).
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int | None = None
  head_dim: int | None = None
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: dict | None = None
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  initializer_range: float = 0.02
  architecture: str = "LlamaForCausalLM"
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  pad_token_id: int | None = None
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: str = "none"
  scan_layers: bool = False
  hidden_act: str = "silu"
  query_pre_attn_scalar: float | None = None
  attn_logit_softcapping: float | None = None
  final_logit_softcapping: float | None = None
  sliding_window: int | None = None
  layer_types: tuple[str, ...] | None = None
  rope_local_base_freq: float | None = None

  def __post_init__(self):
    src = "LlamaConfig"
    set_ = lambda k, v: object.__setattr__(self, k, v)  # frozen dataclass
    for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "max_position_embeddings"):
      v = getattr(self, f)
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
        raise InputError(f"{src}: {f}: expected a positive integer, got {v!r}")
      set_(f, int(v))
    if self.num_key_value_heads is None:
      set_("num_key_value_heads", self.num_attention_heads)
    if self.head_dim is None:
      if self.hidden_size % self.num_attention_heads:
        raise InputError(f"{src}: hidden_size: expected a multiple of num_attention_heads "
                         f"({self.num_attention_heads}) when head_dim is not given, "
                         f"got {self.hidden_size}")
      set_("head_dim", self.hidden_size // self.num_attention_heads)
    for f in ("num_key_value_heads", "head_dim"):
      v = getattr(self, f)
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
        raise InputError(f"{src}: {f}: expected a positive integer, got {v!r}")
      set_(f, int(v))
    if self.num_attention_heads % self.num_key_value_heads:
      raise InputError(f"{src}: num_key_value_heads: expected a divisor of num_attention_heads "
                       f"({self.num_attention_heads}), got {self.num_key_value_heads}")
    if self.head_dim % 2:
      raise InputError(f"{src}: head_dim: expected an even number (RoPE), got {self.head_dim}")
    for f in ("rms_norm_eps", "rope_theta", "initializer_range"):
      v = getattr(self, f)
      if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
        raise InputError(f"{src}: {f}: expected a positive number, got {v!r}")
      set_(f, float(v))
    set_("rope_scaling", _normalize_rope_scaling(self.rope_scaling, src))
    if self.architecture not in ARCHITECTURES:
      raise InputError(f"{src}: architecture: expected one of {', '.join(ARCHITECTURES)}, "
                       f"got {self.architecture!r}")
    for f in ("dtype", "param_dtype"):
      if getattr(self, f) not in DTYPES:
        raise InputError(f"{src}: {f}: expected one of {', '.join(DTYPES)}, "
                         f"got {getattr(self, f)!r}")
    if self.remat not in REMAT_POLICIES:
      raise InputError(f"{src}: remat: expected one of {', '.join(REMAT_POLICIES)}, "
                       f"got {self.remat!r}")
    if isinstance(self.eos_token_id, list):
      set_("eos_token_id", tuple(self.eos_token_id))
    set_("tie_word_embeddings", bool(self.tie_word_embeddings))
    set_("attention_bias", bool(self.attention_bias))
    set_("scan_layers", bool(self.scan_layers))
    self._check_gemma_fields(src)

  def _check_gemma_fields(self, src: str) -> None:
    set_ = lambda k, v: object.__setattr__(self, k, v)
    if self.hidden_act not in HIDDEN_ACTS:
      raise InputError(f"{src}: hidden_act: expected one of {', '.join(HIDDEN_ACTS)}, "
                       f"got {self.hidden_act!r}")
    for f in ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
              "rope_local_base_freq"):
      v = getattr(self, f)
      if v is None:
        continue
      if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
        raise InputError(f"{src}: {f}: expected a positive number or null, got {v!r}")
      set_(f, float(v))
    w = self.sliding_window
    if w is not None:
      if isinstance(w, bool) or not isinstance(w, (int, np.integer)) or w <= 0:
        raise InputError(f"{src}: sliding_window: expected a positive integer or null, got {w!r}")
      set_("sliding_window", int(w))
    types = self.layer_types
    if types is None and self.model_type in _DEFAULT_SLIDING_PATTERN:
      types = sliding_layer_types(self.num_hidden_layers,
                                  _DEFAULT_SLIDING_PATTERN[self.model_type])
    if types is not None:
      if isinstance(types, str) or not isinstance(types, (list, tuple)) or any(
          t not in LAYER_TYPES for t in types):
        raise InputError(f"{src}: layer_types: expected a list of {' / '.join(LAYER_TYPES)}, "
                         f"got {types!r}")
      if len(types) != self.num_hidden_layers:
        raise InputError(f"{src}: layer_types: expected one entry per layer "
                         f"({self.num_hidden_layers}), got {len(types)}")
      types = tuple(types)
      if "sliding_attention" in types and self.sliding_window is None:
        raise InputError(f"{src}: sliding_window: expected a positive integer for the "
                         f"sliding_attention layers of layer_types, got null")
    elif self.sliding_window is not None:
      raise InputError(f"{src}: layer_types: expected which layers use sliding_window "
                       f"({self.sliding_window}), got none")
    set_("layer_types", types)
  def __hash__(self) -> int:  # rope_scaling is a dict; NNX graph definitions must hash
    return hash(json.dumps(dataclasses.asdict(self), sort_keys=True, default=str))

  @property
  def compute_dtype(self) -> Any:
    return DTYPES[self.dtype]

  @property
  def weight_dtype(self) -> Any:
    return DTYPES[self.param_dtype]

  @property
  def model_type(self) -> str:
    return ARCHITECTURES[self.architecture]

  @property
  def is_sliding(self) -> tuple[bool, ...]:
    """Per layer: whether it attends within ``sliding_window`` only."""
    types = self.layer_types or ()
    return tuple(t == "sliding_attention" for t in types) or (False,) * self.num_hidden_layers

  @property
  def attention_scale(self) -> float:
    return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

  def replace(self, **changes: Any) -> LlamaConfig:
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_hf(cls, src: str | Path | Mapping[str, Any], *, dtype: str = "float32",
              param_dtype: str = "float32", remat: str = "none",
              scan_layers: bool = False) -> LlamaConfig:
    """Reads a Hugging Face config: a model directory, a ``config.json`` path, or a dict.

    Accepts both spellings of RoPE settings: ``rope_theta`` + ``rope_scaling`` (transformers 4.x)
    and ``rope_parameters`` (transformers 5.x). Raises InputError naming the file and the field.
    A family's own fields are read by its entry in ``HF_FIELDS`` (``model.family`` fills it).
    """
    data, source = _read_hf_config(src)
    arch = _hf_architecture(data, source)
    model_type = ARCHITECTURES[arch]
    defaults = _HF_DEFAULTS[model_type]
    get = lambda field, default=None: data.get(field, defaults.get(field, default))
    for field in _REQUIRED_HF_FIELDS:
      if data.get(field) is None:
        raise InputError(f"{source}: {field}: expected a value (required field), got nothing")
    gemma = _family_fields(data, get, source, model_type)  # the family's own fields
    theta, scaling = _hf_rope(data, get, source, model_type)
    kwargs = dict(
        vocab_size=data["vocab_size"], hidden_size=data["hidden_size"],
        intermediate_size=data["intermediate_size"], num_hidden_layers=data["num_hidden_layers"],
        num_attention_heads=data["num_attention_heads"],
        num_key_value_heads=get("num_key_value_heads"), head_dim=get("head_dim"),
        rms_norm_eps=data.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
        max_position_embeddings=get("max_position_embeddings"),
        tie_word_embeddings=get("tie_word_embeddings", False),
        attention_bias=True if model_type == "qwen2" else data.get("attention_bias", False),
        initializer_range=data.get("initializer_range", 0.02), architecture=arch,
        bos_token_id=get("bos_token_id"), eos_token_id=get("eos_token_id"),
        pad_token_id=get("pad_token_id"), dtype=dtype, param_dtype=param_dtype, remat=remat,
        scan_layers=scan_layers, **gemma)
    try:
      return cls(**kwargs)
    except InputError as e:
      raise InputError(str(e).replace("LlamaConfig:", f"{source}:", 1)) from None

  def to_hf(self) -> dict[str, Any]:
    """A ``config.json`` dict that transformers' LlamaConfig / Qwen2Config / Gemma2Config accept
    (4.x and 5.x).

    RoPE is written in both spellings: ``rope_theta`` + ``rope_scaling`` and ``rope_parameters``.
    """
    return _to_hf(self)


# A family's own Hugging Face config fields: model type -> fields(hf_config_dict, get, source) ->
# LlamaConfig keyword arguments, with the family's checks. ``model.family`` (the registry of the
# families) fills it, and every import of ``distfair_jax.model`` imports ``family`` first.
HF_FIELDS: dict[str, Callable[[Mapping[str, Any], Callable[..., Any], str], dict[str, Any]]] = {}


def _read_hf_config(src: str | Path | Mapping[str, Any]) -> tuple[dict, str]:
  """(the config dict, where it came from) of a model directory, config.json path or dict."""
  if isinstance(src, Mapping):
    data, source = dict(src), "config dict"
  else:
    path = Path(src)
    if path.is_dir():
      path = path / "config.json"
    source = str(path)
    if not path.is_file():
      raise InputError(f"{source}: config.json: expected a Hugging Face config file, not found")
    try:
      data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
      raise InputError(f"{source}: config.json: expected valid JSON, got {e}") from None
    if not isinstance(data, dict):
      raise InputError(f"{source}: config.json: expected a JSON object, got {type(data).__name__}")
  return data, source


def _hf_architecture(data: Mapping[str, Any], source: str) -> str:
  """The config's architecture (``architectures[0]``, else by ``model_type``), one we support."""
  archs = data.get("architectures")
  if archs:
    arch = archs[0] if isinstance(archs, (list, tuple)) else archs
  else:
    by_type = {HF_MODEL_TYPES.get(v, v): k for k, v in ARCHITECTURES.items()}
    arch = by_type.get(data.get("model_type"), f"model_type={data.get('model_type')!r}")
  if arch not in ARCHITECTURES:
    raise InputError(f"{source}: architectures: expected one of {', '.join(ARCHITECTURES)}, "
                     f"got {arch}")
  return arch


def _family_fields(data: Mapping[str, Any], get, source: str, model_type: str) -> dict[str, Any]:
  """The family's own fields (``HF_FIELDS``; Llama and Qwen2 have none) and the shared refusals."""
  fields = HF_FIELDS.get(model_type)
  if fields is not None:
    gemma = fields(data, get, source)
  elif data.get("hidden_act", "silu") != "silu":
    raise InputError(f"{source}: hidden_act: expected silu, got {data['hidden_act']!r}")
  else:
    gemma = {}
  if data.get("mlp_bias", False):
    raise InputError(f"{source}: mlp_bias: expected false (MLP biases are not supported), got true")
  if model_type == "qwen2" and data.get("use_sliding_window", False):
    raise InputError(f"{source}: use_sliding_window: expected false (sliding-window attention "
                     f"is not supported), got true")
  return gemma


def _hf_rope(data: Mapping[str, Any], get, source: str, model_type: str
             ) -> tuple[float, dict | None]:
  """(rope_theta, normalized rope_scaling) from either spelling of the RoPE settings."""
  rope_params = data.get("rope_parameters")
  if rope_params is not None:
    if not isinstance(rope_params, Mapping):
      raise InputError(f"{source}: rope_parameters: expected a mapping, got {rope_params!r}")
    if rope_params and all(isinstance(v, Mapping) for v in rope_params.values()):
      # Nested per layer type (transformers 5.x): full attention's here; Gemma 3's sliding
      # layers' base is read with its other fields.
      allowed = {"full_attention", "sliding_attention"} if model_type == "gemma3" else set()
      if "full_attention" not in rope_params or set(rope_params) - allowed - {"full_attention"}:
        raise InputError(f"{source}: rope_parameters: expected one set of RoPE parameters (or "
                         f"only {' and '.join(sorted(allowed | {'full_attention'}))}), got "
                         f"layer types {sorted(rope_params)}")
      rope_params = rope_params["full_attention"]
    theta = rope_params.get("rope_theta", get("rope_theta", 10000.0))
    scaling = _normalize_rope_scaling(rope_params, source, "rope_parameters")
  else:
    theta = get("rope_theta", 10000.0)
    scaling = _normalize_rope_scaling(data.get("rope_scaling"), source)
  return theta, scaling


def _to_hf(config: LlamaConfig) -> dict[str, Any]:
  """A ``config.json`` dict that transformers' LlamaConfig / Qwen2Config / Gemma2Config accept
  (4.x and 5.x).

  RoPE is written in both spellings: ``rope_theta`` + ``rope_scaling`` and ``rope_parameters``.
  """
  rope_parameters = {"rope_type": "default", "rope_theta": config.rope_theta}
  if config.rope_scaling:
    rope_parameters.update(config.rope_scaling)
  out: dict[str, Any] = {
      "architectures": [config.architecture],
      "model_type": HF_MODEL_TYPES.get(config.model_type, config.model_type),
      "vocab_size": config.vocab_size,
      "hidden_size": config.hidden_size,
      "intermediate_size": config.intermediate_size,
      "num_hidden_layers": config.num_hidden_layers,
      "num_attention_heads": config.num_attention_heads,
      "num_key_value_heads": config.num_key_value_heads,
      "head_dim": config.head_dim,
      "hidden_act": "silu",
      "rms_norm_eps": config.rms_norm_eps,
      "rope_theta": config.rope_theta,
      "rope_scaling": dict(config.rope_scaling) if config.rope_scaling else None,
      "rope_parameters": rope_parameters,
      "max_position_embeddings": config.max_position_embeddings,
      "tie_word_embeddings": config.tie_word_embeddings,
      "initializer_range": config.initializer_range,
      "attention_dropout": 0.0,
      "use_cache": True,
  }
  if config.model_type == "llama":
    out.update(attention_bias=config.attention_bias, mlp_bias=False)
  elif config.model_type == "qwen2":
    out.update(use_sliding_window=False)
  elif config.model_type == "qwen3":
    out.update(attention_bias=False, use_sliding_window=False, sliding_window=None)
  else:
    integral = lambda x: int(x) if x is not None and float(x).is_integer() else x
    out.update(hidden_act=config.hidden_act, hidden_activation=config.hidden_act,
               attention_bias=False,
               query_pre_attn_scalar=integral(config.query_pre_attn_scalar or config.head_dim),
               attn_logit_softcapping=config.attn_logit_softcapping,
               final_logit_softcapping=config.final_logit_softcapping,
               sliding_window=config.sliding_window, layer_types=list(config.layer_types))
  if config.model_type == "gemma3":
    local = {"rope_type": "default", "rope_theta": config.rope_local_base_freq or config.rope_theta}
    out.update(rope_local_base_freq=local["rope_theta"],
               rope_parameters={"full_attention": rope_parameters, "sliding_attention": local})
  for f in ("bos_token_id", "eos_token_id", "pad_token_id"):
    v = getattr(config, f)
    if v is not None:
      out[f] = list(v) if isinstance(v, tuple) else v
  return out
