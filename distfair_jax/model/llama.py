"""Flax NNX Llama family: Llama 2/3/3.x (RoPE scaling, GQA), Qwen2 (q/k/v biases), tied embeddings;
Gemma 2, Qwen3 and Gemma 3 reuse these modules (``distfair_jax.model.{gemma2,qwen3,gemma3}``).

The parameter tree mirrors Hugging Face's names so that a converter maps tensors one to one:

  embed_tokens.embedding                        [vocab, hidden]          (HF model.embed_tokens.weight)
  layers[i].self_attn.{q,k,v}_proj.kernel       [hidden, heads*head_dim]  (HF weight, transposed)
  layers[i].self_attn.{q,k,v}_proj.bias         [heads*head_dim]          (only when attention_bias)
  layers[i].self_attn.o_proj.bias               [hidden]                  (Llama with attention_bias)
  layers[i].self_attn.o_proj.kernel             [heads*head_dim, hidden]
  layers[i].mlp.{gate,up}_proj.kernel           [hidden, intermediate]
  layers[i].mlp.down_proj.kernel                [intermediate, hidden]
  layers[i].{input,post_attention}_layernorm.scale  [hidden]
  norm.scale                                    [hidden]
  lm_head.kernel                                [hidden, vocab]           (absent when tied)

With ``scan_layers`` the layers are one subtree ``layers.*`` whose leaves gain a leading
``[num_layers]`` axis (logical name ``layers``, never sharded); params directories on disk keep the
per-layer names above (``distfair_jax.model.layout``).

Config-driven features the family shares (Gemma 2 sets them; Llama and Qwen2 leave them off):
attention-logit and final-logit soft-capping (``c * tanh(x / c)``), an attention scale from
``query_pre_attn_scalar``, GeGLU (``hidden_act``), and sliding-window attention on the layers that
``layer_types`` marks ``sliding_attention`` (a key is visible when ``q_pos - k_pos < sliding_window``,
by RoPE position, in the full forward and in the KV cache alike).

RoPE uses Hugging Face's half-split layout (rotate_half), so converted q/k weights need no permutation.
Every parameter carries logical axis names in its ``out_sharding`` metadata (eager sharding off: the
model never shards itself; ``distfair_jax.sharding`` places it on a mesh from one rules table).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from distfair_jax import sharding as shd
from distfair_jax.errors import InputError
from distfair_jax.losses import soft_cap

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
    """
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

    archs = data.get("architectures")
    if archs:
      arch = archs[0] if isinstance(archs, (list, tuple)) else archs
    else:
      by_type = {HF_MODEL_TYPES.get(v, v): k for k, v in ARCHITECTURES.items()}
      arch = by_type.get(data.get("model_type"), f"model_type={data.get('model_type')!r}")
    if arch not in ARCHITECTURES:
      raise InputError(f"{source}: architectures: expected one of {', '.join(ARCHITECTURES)}, "
                       f"got {arch}")
    model_type = ARCHITECTURES[arch]
    defaults = _HF_DEFAULTS[model_type]
    get = lambda field, default=None: data.get(field, defaults.get(field, default))
    for field in _REQUIRED_HF_FIELDS:
      if data.get(field) is None:
        raise InputError(f"{source}: {field}: expected a value (required field), got nothing")
    from distfair_jax.model import family  # here: family.py imports this module
    gemma: dict[str, Any] = {}  # the family's own fields
    if model_type == "gemma2":
      gemma = _gemma2_fields(data, get, source)
    elif model_type in family.HF_FIELDS:  # Qwen3, Gemma 3: read by their own modules
      gemma = family.hf_fields(model_type)(data, get, source)
    elif data.get("hidden_act", "silu") != "silu":
      raise InputError(f"{source}: hidden_act: expected silu, got {data['hidden_act']!r}")
    if data.get("mlp_bias", False):
      raise InputError(f"{source}: mlp_bias: expected false (MLP biases are not supported), got true")
    if model_type == "qwen2" and data.get("use_sliding_window", False):
      raise InputError(f"{source}: use_sliding_window: expected false (sliding-window attention "
                       f"is not supported), got true")

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
    rope_parameters = {"rope_type": "default", "rope_theta": self.rope_theta}
    if self.rope_scaling:
      rope_parameters.update(self.rope_scaling)
    out: dict[str, Any] = {
        "architectures": [self.architecture],
        "model_type": HF_MODEL_TYPES.get(self.model_type, self.model_type),
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_hidden_layers,
        "num_attention_heads": self.num_attention_heads,
        "num_key_value_heads": self.num_key_value_heads,
        "head_dim": self.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": self.rms_norm_eps,
        "rope_theta": self.rope_theta,
        "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
        "rope_parameters": rope_parameters,
        "max_position_embeddings": self.max_position_embeddings,
        "tie_word_embeddings": self.tie_word_embeddings,
        "initializer_range": self.initializer_range,
        "attention_dropout": 0.0,
        "use_cache": True,
    }
    if self.model_type == "llama":
      out.update(attention_bias=self.attention_bias, mlp_bias=False)
    elif self.model_type == "qwen2":
      out.update(use_sliding_window=False)
    elif self.model_type == "qwen3":
      out.update(attention_bias=False, use_sliding_window=False, sliding_window=None)
    else:
      integral = lambda x: int(x) if x is not None and float(x).is_integer() else x
      out.update(hidden_act=self.hidden_act, hidden_activation=self.hidden_act,
                 attention_bias=False,
                 query_pre_attn_scalar=integral(self.query_pre_attn_scalar or self.head_dim),
                 attn_logit_softcapping=self.attn_logit_softcapping,
                 final_logit_softcapping=self.final_logit_softcapping,
                 sliding_window=self.sliding_window, layer_types=list(self.layer_types))
    if self.model_type == "gemma3":
      local = {"rope_type": "default", "rope_theta": self.rope_local_base_freq or self.rope_theta}
      out.update(rope_local_base_freq=local["rope_theta"],
                 rope_parameters={"full_attention": rope_parameters, "sliding_attention": local})
    for f in ("bos_token_id", "eos_token_id", "pad_token_id"):
      v = getattr(self, f)
      if v is not None:
        out[f] = list(v) if isinstance(v, tuple) else v
    return out


def _gemma2_fields(data: Mapping[str, Any], get, source: str) -> dict[str, Any]:
  """The Gemma 2 fields of a Hugging Face config (transformers' defaults where absent; an explicit
  null turns soft-capping off). transformers' Gemma 2 reads ``hidden_activation`` (null: the
  default, as transformers' Gemma does) and ignores ``hidden_act``."""
  act = get("hidden_activation") or "gelu_pytorch_tanh"
  if act != "gelu_pytorch_tanh":
    raise InputError(f"{source}: hidden_activation: expected gelu_pytorch_tanh, got {act!r}")
  if data.get("attention_bias", False):
    raise InputError(f"{source}: attention_bias: expected false (Gemma attention biases are "
                     f"not supported), got {data['attention_bias']!r}")
  if data.get("use_bidirectional_attention"):
    raise InputError(f"{source}: use_bidirectional_attention: expected false or null (causal "
                     f"attention), got {data['use_bidirectional_attention']!r}")
  if data.get("attention_dropout") not in (None, 0, 0.0):
    raise InputError(f"{source}: attention_dropout: expected 0, got {data['attention_dropout']!r}")
  return dict(hidden_act="gelu_pytorch_tanh", query_pre_attn_scalar=get("query_pre_attn_scalar"),
              attn_logit_softcapping=get("attn_logit_softcapping"),
              final_logit_softcapping=get("final_logit_softcapping"),
              sliding_window=get("sliding_window"), layer_types=data.get("layer_types"))


# ------------------------------------------------------------------------------------------------
# RoPE
# ------------------------------------------------------------------------------------------------


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
  """Inverse frequencies ``[head_dim // 2]`` float32, with llama3 / linear scaling applied."""
  dim = config.head_dim
  inv = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
  sc = config.rope_scaling
  if sc is None:
    pass
  elif sc["rope_type"] == "linear":
    inv = inv / sc["factor"]
  elif sc["rope_type"] == "llama3":
    factor, low, high = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
    old_len = sc["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    inv = np.where(medium, smoothed, scaled)
  return inv.astype(np.float32)


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
  """positions: [B, T] int -> (cos, sin): [B, T, head_dim] float32 (half-split layout)."""
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x: [B, T, N, head_dim]; cos, sin: [B, T, head_dim] -> [B, T, N, head_dim] (x's dtype)."""
  xf = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
  return (xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]).astype(x.dtype)


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
  """attention_mask: [B, L] (1 real, 0 pad) -> positions [B, L] int32 = cumsum(mask) - 1, >= 0."""
  return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


# ------------------------------------------------------------------------------------------------
# Modules
# ------------------------------------------------------------------------------------------------


def _param_meta(*names: str) -> dict[str, Any]:
  return {"out_sharding": tuple(names), "eager_sharding": False}


def _linear(cfg: LlamaConfig, n_in: int, n_out: int, axes: tuple[str, str], *, bias: bool,
            rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(
      n_in, n_out, use_bias=bias, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
      kernel_init=nnx.initializers.normal(cfg.initializer_range),
      bias_init=nnx.initializers.zeros_init(), rngs=rngs,
      kernel_metadata=_param_meta(*axes), bias_metadata=_param_meta(axes[1]))


class RMSNorm(nnx.Module):
  """RMSNorm as in Hugging Face: normalise in float32, cast to the compute dtype, then scale."""

  def __init__(self, dim: int, eps: float, *, dtype: Any, param_dtype: Any):
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), **_param_meta("norm"))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., D] -> [..., D] in the compute dtype."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(self.dtype) * y.astype(self.dtype)


class Attention(nnx.Module):
  """Grouped-query self-attention with separate q/k/v/o projections (LoRA can wrap each)."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    d, h, kv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    self.q_proj = _linear(cfg, d, h * hd, ("embed", "heads"), bias=cfg.attention_bias, rngs=rngs)
    self.k_proj = _linear(cfg, d, kv * hd, ("embed", "kv_heads"), bias=cfg.attention_bias,
                          rngs=rngs)
    self.v_proj = _linear(cfg, d, kv * hd, ("embed", "kv_heads"), bias=cfg.attention_bias,
                          rngs=rngs)
    # transformers' Llama biases o_proj too when attention_bias is set; Qwen2 never does
    self.o_proj = _linear(cfg, h * hd, d, ("heads", "embed"),
                          bias=cfg.attention_bias and cfg.model_type == "llama", rngs=rngs)
    self.num_heads, self.num_kv_heads, self.head_dim = h, kv, hd
    self.scale = cfg.attention_scale
    self.softcap = cfg.attn_logit_softcapping

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
               kv_cache: tuple[jax.Array, jax.Array] | None = None,
               index: jax.Array | None = None):
    """x: [B, T, D]; cos/sin: [B, T, head_dim]; mask: [B, T, S] bool (S = T without a cache).

    With ``kv_cache = (k, v)`` ([B, kv_heads, S, head_dim] each) the new keys/values are written at
    slot ``index`` and attention runs over all S slots. Returns (out [B, T, D], new (k, v) or None).
    """
    b, t, _ = x.shape
    q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    q, k = self._norm_qk(q, k)
    q = shd.constrain(apply_rope(q, cos, sin), ("batch", "length", "heads", "head_dim"))
    k = shd.constrain(apply_rope(k, cos, sin), ("batch", "length", "kv_heads", "head_dim"))
    v = shd.constrain(v, ("batch", "length", "kv_heads", "head_dim"))
    new_cache = None
    if isinstance(kv_cache, SharedKV):
      out, new_cache = self._shared_prefix_attention(q, k, v, mask, kv_cache, index)
    elif kv_cache is not None:
      out, new_cache = self._cached_attention(q, k, v, mask, kv_cache, index)
    elif self.softcap is None:
      out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, :, :], scale=self.scale)
    else:  # soft-capped scores: dot_product_attention has no such option
      out = self._attend(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask)
    out = shd.constrain(out, ("batch", "length", "heads", "head_dim"))
    return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim)), new_cache

  def _norm_qk(self, q: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Queries [B, T, heads, hd] and keys [B, T, kv_heads, hd] before RoPE: unchanged here;
    Qwen3 and Gemma 3 normalise each head (``qwen3.QKNormAttention``)."""
    return q, k

  def _cached_attention(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                        kv_cache: tuple[jax.Array, jax.Array], index: jax.Array):
    """Writes k/v into the cache at slot ``index``, then attends over all its S slots.

    q: [B, T, heads, head_dim]; k, v: [B, T, kv_heads, head_dim]; mask: [B, T, S] bool;
    kv_cache: ([B, kv_heads, S, head_dim], same). Returns (out [B, T, heads, head_dim], new cache).

    The cache keeps kv_heads before S so that both attention contractions read it in place (batch
    dims b, kv_heads lead); only the T new rows and the queries are transposed. Query heads are
    grouped per kv head ([B, kv_heads, group * T, head_dim]), so repeated keys/values are never
    materialised. Same arithmetic as ``jax.nn.dot_product_attention``: f32 logits and softmax,
    probabilities cast to the value dtype.
    """
    ck, cv = kv_cache
    zero = jnp.zeros((), jnp.int32)
    start = (zero, zero, index, zero)
    ck = jax.lax.dynamic_update_slice(ck, k.transpose(0, 2, 1, 3).astype(ck.dtype), start)
    cv = jax.lax.dynamic_update_slice(cv, v.transpose(0, 2, 1, 3).astype(cv.dtype), start)
    return self._attend(q, ck.astype(q.dtype), cv.astype(q.dtype), mask), (ck, cv)

  def _shared_prefix_attention(self, q: jax.Array, k: jax.Array, v: jax.Array,
                               mask: tuple[jax.Array, jax.Array], kv: SharedKV, index: jax.Array):
    """One decode step over a shared prompt cache plus a per-row cache of the new tokens.

    q: [N, 1, heads, head_dim]; k, v: [N, 1, kv_heads, head_dim] (N = P * rounds, rows in
    prompt-major order); mask: (prefix [P, L] bool, new [N or 1, T] bool); kv: ``SharedKV``. The new
    k/v are written at slot ``index`` of the per-row part. Returns (out [N, 1, heads, head_dim],
    the per-row keys [N, kv_heads, head_dim, T] and values [N, kv_heads, T, head_dim]).
    """
    zero = jnp.zeros((), jnp.int32)
    ck = jax.lax.dynamic_update_slice(kv.k, k.transpose(0, 2, 3, 1).astype(kv.k.dtype),
                                      (zero, zero, zero, index))
    cv = jax.lax.dynamic_update_slice(kv.v, v.transpose(0, 2, 1, 3).astype(kv.v.dtype),
                                      (zero, zero, index, zero))
    out = self._attend_shared(q[:, 0], kv.prefix_k.astype(q.dtype), kv.prefix_v.astype(q.dtype),
                              ck.astype(q.dtype), cv.astype(q.dtype), *mask)
    return out[:, None], (ck, cv)

  def _attend_shared(self, q: jax.Array, prefix_k: jax.Array, prefix_v: jax.Array,
                     new_k: jax.Array, new_v: jax.Array, prefix_mask: jax.Array,
                     new_mask: jax.Array) -> jax.Array:
    """Attention of one query per row over [prompt slots | new slots], one softmax.

    q: [N, heads, hd]; prefix_k, prefix_v: [P, kv_heads, L, hd] (each prompt's slots, stored once);
    new_k: [N, kv_heads, hd, T] (keys transposed: each row's scores are then a plain [G, hd] x
    [hd, T] product, which XLA:CPU runs ~4x faster than the same contraction over [T, hd] keys);
    new_v: [N, kv_heads, T, hd]; prefix_mask: [P, L] bool; new_mask: [N or 1, T] bool.
    Returns [N, heads, hd]. The queries of a prompt's R = N / P rounds and its G query heads per kv
    head form one [R * G, hd] block per (prompt, kv head), so the prompt's keys and values are read
    once per prompt in one batched matmul, not once per row. The scores of both parts are
    concatenated (the plain cache's slot order: prompt, then new tokens) and scaled, soft-capped,
    masked and normalised exactly as ``_attend`` does.
    """
    n, h, hd = q.shape
    p, kvh, length, _ = prefix_k.shape
    r, g, t = n // p, h // kvh, new_v.shape[2]
    acc = jnp.promote_types(q.dtype, jnp.float32)
    q_rows = q.reshape(n, kvh, g, hd)
    to_prompt = lambda a: a.reshape(p, r, kvh, g, -1).transpose(0, 2, 1, 3, 4).reshape(p, kvh, r * g, -1)
    to_rows = lambda a: a.reshape(p, kvh, r, g, -1).transpose(0, 2, 1, 3, 4).reshape(n, kvh, g, -1)
    s_prefix = jnp.einsum("pkqd,pksd->pkqs", to_prompt(q_rows), prefix_k,
                          preferred_element_type=acc)  # [P, kv_heads, R * G, L]
    s_new = jnp.einsum("nkgd,nkds->nkgs", q_rows, new_k, preferred_element_type=acc)  # [N, kvh, G, T]
    logits = jnp.concatenate([to_rows(s_prefix), s_new], axis=-1)  # [N, kv_heads, G, L + T]
    logits = (logits * jnp.asarray(self.scale, logits.dtype)).astype(jnp.float32)
    logits = soft_cap(logits, self.softcap)
    visible = jnp.concatenate([jnp.repeat(prefix_mask, r, axis=0),
                               jnp.broadcast_to(new_mask, (n, t))], axis=-1)  # [N, L + T]
    logits = jnp.where(visible[:, None, None, :], logits,
                       jnp.float32(-0.7 * float(jnp.finfo(jnp.float32).max)))
    probs = jax.nn.softmax(logits, axis=-1).astype(new_v.dtype)
    out_prefix = jnp.einsum("pkqs,pksd->pkqd", to_prompt(probs[..., :length]), prefix_v)
    out_new = jnp.einsum("nkgs,nksd->nkgd", probs[..., length:], new_v)  # [N, kv_heads, G, hd]
    return (to_rows(out_prefix) + out_new).reshape(n, h, hd)

  def _attend(self, q: jax.Array, keys: jax.Array, values: jax.Array,
              mask: jax.Array) -> jax.Array:
    """q: [B, T, heads, hd]; keys, values: [B, kv_heads, S, hd]; mask: [B, T, S] bool ->
    [B, T, heads, hd]. Scores scaled, soft-capped when the config says so (``c * tanh(x / c)``,
    before the mask, as transformers does), then masked."""
    b, t, h, hd = q.shape
    kvh, s = self.num_kv_heads, keys.shape[2]
    g = h // kvh
    # [B, T, heads, hd] -> [B, kv_heads, group * T, hd] (a free reshape when T == 1).
    qg = q.reshape(b, t, kvh, g, hd).transpose(0, 2, 3, 1, 4).reshape(b, kvh, g * t, hd)
    logits = jnp.einsum("bkqd,bksd->bkqs", qg, keys,
                        preferred_element_type=jnp.promote_types(q.dtype, jnp.float32))
    logits = (logits * jnp.asarray(self.scale, logits.dtype)).astype(jnp.float32)
    logits = soft_cap(logits, self.softcap)
    logits = jnp.where(mask[:, None, None, :, :], logits.reshape(b, kvh, g, t, s),
                       jnp.float32(-0.7 * float(jnp.finfo(jnp.float32).max)))
    probs = jax.nn.softmax(logits, axis=-1).astype(values.dtype).reshape(b, kvh, g * t, s)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, values)  # [B, kv_heads, group * T, hd]
    out = out.reshape(b, kvh, g, t, hd).transpose(0, 3, 1, 2, 4)
    return out.reshape(b, t, h, hd)


_ACTIVATIONS = {"silu": jax.nn.silu,
                "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True)}


class MLP(nnx.Module):
  """Gated MLP: down(act(gate(x)) * up(x)), act silu (SwiGLU) or tanh-approximate gelu (GeGLU)."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    d, f = cfg.hidden_size, cfg.intermediate_size
    self.gate_proj = _linear(cfg, d, f, ("embed", "mlp"), bias=False, rngs=rngs)
    self.up_proj = _linear(cfg, d, f, ("embed", "mlp"), bias=False, rngs=rngs)
    self.down_proj = _linear(cfg, f, d, ("mlp", "embed"), bias=False, rngs=rngs)
    self.activation = cfg.hidden_act

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, T, D] -> [B, T, D]."""
    if x.shape[1] == 1 and type(self.gate_proj) is type(self.up_proj) is nnx.Linear:
      gate, up = self._gate_up(x)
    else:
      gate, up = self.gate_proj(x), self.up_proj(x)
    h = _ACTIVATIONS[self.activation](gate) * up
    return self.down_proj(shd.constrain(h, ("batch", "length", "mlp")))

  def _gate_up(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A decode step's gate and up projections as ONE matmul against the kernels stacked to
    [D, 2, F] (F keeps its sharding): with one token per row XLA:CPU runs the [B, D] x [D, 2F]
    product ~1.5x faster than two [B, D] x [D, F] ones. Inside the decode loop the stacking is
    loop-invariant (hoisted); each output element is the same dot product as ``nnx.Linear``'s."""
    g, u = self.gate_proj, self.up_proj
    x, kernel = nnx.nn.dtypes.promote_dtype(
        (x, jnp.stack([g.kernel[...], u.kernel[...]], axis=1)), dtype=g.dtype)
    y = jnp.einsum("btd,dcf->btcf", x, kernel, precision=g.precision)  # [B, 1, 2, F]
    return y[:, :, 0], y[:, :, 1]


class DecoderLayer(nnx.Module):
  """Pre-norm decoder block: x + attn(norm(x)), then x + mlp(norm(x)). ``attention_cls``: the
  attention module a family's subclass swaps in (Qwen3's QK-norm)."""

  attention_cls: type = Attention

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
    self.self_attn = self.attention_cls(cfg, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x, cos, sin, mask, kv_cache=None, index=None):
    """x: [B, T, D] -> ([B, T, D], new kv cache or None); see Attention for the other args."""
    h, new_cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache, index)
    x = x + h
    x = x + self.mlp(self.post_attention_layernorm(x))
    return shd.constrain(x, ("batch", "length", "act_embed")), new_cache


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  """Decoding state (a pytree of arrays; donate it to jit).

  k, v: per layer [B, kv_heads, S, head_dim] (slots contiguous per kv head: a decode step reads them
  without transposing), a tuple of one array per layer, or one array [layers, B, kv_heads, S,
  head_dim] for a model with ``scan_layers``; mask: [B, S] bool, slots holding a real token (left
  padding leaves invalid slots); index: [] int32, next slot to write (shared by all rows);
  positions: [B] int32, RoPE position of each row's next token.
  """

  k: tuple[jax.Array, ...] | jax.Array
  v: tuple[jax.Array, ...] | jax.Array
  mask: jax.Array
  index: jax.Array
  positions: jax.Array

  @property
  def batch_size(self) -> int:
    return self.mask.shape[0]

  @property
  def max_length(self) -> int:
    return self.mask.shape[1]

  def logical_axes(self) -> KVCache:
    """Same structure with a PartitionSpec of logical axis names per leaf (for sharding)."""
    P = jax.sharding.PartitionSpec
    kv = P("batch", "kv_heads", "cache_length", "head_dim")
    if isinstance(self.k, tuple):
      k, v = tuple(kv for _ in self.k), tuple(kv for _ in self.v)
    else:
      k = v = P("layers", *kv)
    return KVCache(k=k, v=v, mask=P("batch", "cache_length"), index=P(), positions=P("batch"))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SharedKV:
  """One layer's keys/values for shared-prefix decoding (what ``Attention`` gets as ``kv_cache``).

  prefix_k, prefix_v: [P, kv_heads, L, head_dim], each prompt's slots once; the new tokens of each
  of the N = P * rounds rows (prompt-major: row p * rounds + r): k [N, kv_heads, head_dim, T] (keys
  transposed), v [N, kv_heads, T, head_dim].
  """

  prefix_k: jax.Array
  prefix_v: jax.Array
  k: jax.Array
  v: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SharedPrefixCache:
  """Decoding state when every prompt is continued ``rounds`` times (``Llama.shared_prefix_cache``).

  prefix_k, prefix_v: per layer [P, kv_heads, L, head_dim] (a tuple, or one array with a leading
  [layers] axis under ``scan_layers``), written by the prefill and only read afterwards;
  prefix_mask: [P, L] bool, slots holding a real prompt token; prefix_positions: [P, L] int32, their
  RoPE positions; k, v: per layer [N, kv_heads, head_dim, T] (keys transposed) and [N, kv_heads,
  T, head_dim], the rows' new tokens (N = P * rounds); index: [] int32, next new slot to write
  (shared by all rows); positions: [N] int32, RoPE position of each row's next token. Rounds of a
  prompt stay at one position (they advance together).
  """

  prefix_k: tuple[jax.Array, ...] | jax.Array
  prefix_v: tuple[jax.Array, ...] | jax.Array
  prefix_mask: jax.Array
  prefix_positions: jax.Array
  k: tuple[jax.Array, ...] | jax.Array
  v: tuple[jax.Array, ...] | jax.Array
  index: jax.Array
  positions: jax.Array

  @property
  def batch_size(self) -> int:
    return self.positions.shape[0]

  @property
  def rounds(self) -> int:
    return self.positions.shape[0] // self.prefix_mask.shape[0]

  @property
  def new_length(self) -> int:
    return self.k.shape[-1] if not isinstance(self.k, tuple) else self.k[0].shape[-1]

  def grow(self, new_length: int) -> SharedPrefixCache:
    """The same cache with ``new_length`` (>= the current) per-row slots, the new ones empty."""
    extra = new_length - self.new_length
    if extra < 0:
      raise ValueError(f"grow: expected at least {self.new_length} slots, got {new_length}")
    if extra == 0:
      return self
    pad_k = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])
    pad_v = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, extra), (0, 0)])
    return dataclasses.replace(self, k=jax.tree.map(pad_k, self.k), v=jax.tree.map(pad_v, self.v))


_SCAN_METADATA = {nnx.PARTITION_NAME: "layers"}  # the stacked axis's logical name


def _decoder_layers(cfg: LlamaConfig, rngs: nnx.Rngs, layer_cls: type = DecoderLayer):
  """The decoder layers: an ``nnx.List`` of modules, or with ``scan_layers`` one module whose
  every parameter is stacked on a leading ``layers`` axis (built by ``nnx.vmap`` over split
  keys, as Flax's scan-over-layers example does)."""
  n = cfg.num_hidden_layers
  if not cfg.scan_layers:
    return nnx.List([layer_cls(cfg, rngs=rngs) for _ in range(n)])

  @nnx.split_rngs(splits=n)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=_SCAN_METADATA)
  def create(rngs: nnx.Rngs):
    return layer_cls(cfg, rngs=rngs)

  return create(rngs)


def _layer_mask(masks: tuple[Any, ...], sliding) -> Any:
  """One layer's attention mask (or RoPE (cos, sin)): ``masks`` is (full,) or (full, sliding
  window), each an array or a pair of arrays (shared-prefix decoding's masks, a RoPE's cos and
  sin); ``sliding`` a Python bool (the layer loop) or a traced one (a scanned layer's flag)."""
  if len(masks) == 1:
    return masks[0]
  if isinstance(sliding, (bool, np.bool_)):
    return masks[1] if sliding else masks[0]
  return jax.tree.map(lambda full, window: jnp.where(sliding, window, full), masks[0], masks[1])


class Llama(nnx.Module):
  """Llama / Qwen2 decoder-only transformer returning hidden states after the final norm.

  Subclasses (``gemma2.Gemma2``) swap the decoder layer and norm classes and the embedding; the
  forward, the masks, the KV cache and the scan over layers are shared.
  """

  decoder_layer_cls: type = DecoderLayer
  norm_cls: type = RMSNorm

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    cfg = config
    if type(self) is Llama and cfg.model_type != "llama" and cfg.model_type != "qwen2":
      raise ValueError(f"Llama: a {cfg.architecture} config needs its own module class; build "
                       f"it with distfair_jax.model.family.build(config, rngs=...)")
    self.config = cfg
    self.embed_tokens = nnx.Embed(
        cfg.vocab_size, cfg.hidden_size, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
        embedding_init=nnx.initializers.normal(cfg.initializer_range), rngs=rngs,
        embedding_metadata=_param_meta("vocab", "embed"))
    self.layers = _decoder_layers(cfg, rngs, self.decoder_layer_cls)
    self.norm = self.norm_cls(cfg.hidden_size, cfg.rms_norm_eps, dtype=cfg.compute_dtype,
                              param_dtype=cfg.weight_dtype)
    if not cfg.tie_word_embeddings:
      self.lm_head = _linear(cfg, cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), bias=False,
                             rngs=rngs)

  # -- full-sequence forward ----------------------------------------------------------------------

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
               positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None) -> jax.Array:
    """input_ids: [B, L] int; attention_mask: [B, L] (1 real, 0 pad; left or right padding).

    Shared-prefix packing (``segment_ids`` given, ``attention_mask`` ignored): segment_ids [B, L] int
    with 0 = pad, 1 = a prefix every later token sees, s >= 2 = a branch that sees the prefix and
    its own earlier tokens only; positions [B, L] int, the RoPE position of each token (a branch
    continues from the prefix's length). Each branch's hidden states then equal those of the
    separate sequence prefix + branch.

    Returns hidden: [B, L, D] (compute dtype), after the final norm.
    """
    length = input_ids.shape[1]
    idx = jnp.arange(length)
    causal = idx[None, :, None] >= idx[None, None, :]
    if segment_ids is not None:
      if positions is None:
        raise ValueError("segment_ids need explicit positions")
      seg_q, seg_k = segment_ids[:, :, None], segment_ids[:, None, :]
      visible = (seg_k != 0) & ((seg_k == 1) | (seg_k == seg_q))
    else:
      if attention_mask is None:
        attention_mask = jnp.ones(input_ids.shape, jnp.int32)
      if positions is None:
        positions = positions_from_mask(attention_mask)
      visible = attention_mask.astype(bool)[:, None, :]
    ropes = self._ropes(positions)
    # Pad queries may always see themselves, so no softmax row is empty.
    diagonal = (idx[:, None] == idx[None, :])[None]
    masks = self._masks(causal & visible, diagonal, positions, positions)
    x = self._embed(input_ids)

    def run_layer(x, layer: DecoderLayer, sliding, ropes, masks):
      cos, sin = _layer_mask(ropes, sliding)
      return layer(x, cos, sin, _layer_mask(masks, sliding))[0]

    if self.config.remat != "none":
      policy = (None if self.config.remat == "full"
                else jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
      run_layer = nnx.remat(run_layer, policy=policy)
    if self.config.scan_layers:
      x = nnx.scan(run_layer, in_axes=(nnx.Carry, 0, 0, None, None), out_axes=nnx.Carry,
                   transform_metadata=_SCAN_METADATA)(
                       x, self.layers, jnp.asarray(self.config.is_sliding), ropes, masks)
    else:
      for layer, sliding in zip(self.layers, self.config.is_sliding):
        x = run_layer(x, layer, sliding, ropes, masks)
    return self.norm(x)

  def _ropes(self, positions: jax.Array) -> tuple[tuple[jax.Array, jax.Array], ...]:
    """positions [B, T] -> ((cos, sin),): one RoPE for every layer, chosen per layer as the masks
    are (``_layer_mask``); Gemma 3 returns (global, sliding-window) pairs."""
    return (rope_cos_sin(positions, rope_inv_freq(self.config)),)

  def _masks(self, visible: jax.Array, diagonal: jax.Array, q_pos: jax.Array,
             k_pos: jax.Array) -> tuple[jax.Array, ...]:
    """(full,) or, with sliding-window layers, (full, sliding): [B, T, S] bool each.

    visible: [B, T, S] causal and padding visibility; diagonal: [1 or B, T, S], each query's own
    slot (always visible, so no softmax row is empty); q_pos [B, T], k_pos [B, S]: RoPE
    positions. A sliding-window layer also needs ``q_pos - k_pos < sliding_window`` (positions,
    not slots, so packed branches and left padding count real tokens only).
    """
    full = visible | diagonal
    if not any(self.config.is_sliding):
      return (full,)
    window = (q_pos[:, :, None] - k_pos[:, None, :]) < self.config.sliding_window
    return full, (visible & window) | diagonal

  def _embed(self, input_ids: jax.Array) -> jax.Array:
    x = self.embed_tokens(input_ids.astype(jnp.int32))
    return shd.constrain(x, ("batch", "length", "act_embed"))

  @property
  def logit_softcap(self) -> float | None:
    """The final-logit soft-cap ``c`` (logits ``c * tanh(z / c)``), or None: what every consumer
    of ``unembedding()`` passes to the losses (``losses.token_logps_from_hidden(...,
    softcap=...)``, ``losses.steering_logits_from_hidden``); ``logits()`` applies it itself."""
    return self.config.final_logit_softcapping

  # -- output projection --------------------------------------------------------------------------

  def unembedding(self) -> jax.Array:
    """The output projection [D, V] (embed_tokens transposed when tied), in the compute dtype."""
    if self.config.tie_word_embeddings:
      w = self.embed_tokens.embedding[...].T
    else:
      w = self.lm_head.kernel[...]
    return w.astype(self.config.compute_dtype)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """hidden: [..., D] -> logits [..., V] float32 (matmul in the compute dtype, f32 accumulate;
    soft-capped when the config has a final_logit_softcapping)."""
    w = self.unembedding()
    out = jnp.einsum("...d,dv->...v", hidden.astype(w.dtype), w,
                     preferred_element_type=jnp.float32)
    out = soft_cap(out, self.logit_softcap)
    if out.ndim == 3:
      out = shd.constrain(out, ("batch", "length", "vocab"))
    return out

  # -- KV-cache decoding --------------------------------------------------------------------------

  def init_cache(self, batch: int, max_length: int, dtype: Any = None) -> KVCache:
    """An empty cache for ``batch`` rows and ``max_length`` slots (prompt + generated tokens)."""
    cfg = self.config
    dt = cfg.compute_dtype if dtype is None else (DTYPES[dtype] if isinstance(dtype, str) else dtype)
    shape = (batch, cfg.num_key_value_heads, max_length, cfg.head_dim)
    n = cfg.num_hidden_layers
    if cfg.scan_layers:
      k, v = jnp.zeros((n, *shape), dt), jnp.zeros((n, *shape), dt)
    else:
      k = tuple(jnp.zeros(shape, dt) for _ in range(n))
      v = tuple(jnp.zeros(shape, dt) for _ in range(n))
    return KVCache(k=k, v=v, mask=jnp.zeros((batch, max_length), bool), index=jnp.zeros((), jnp.int32),
                   positions=jnp.zeros((batch,), jnp.int32))

  def prefill(self, input_ids: jax.Array, attention_mask: jax.Array,
              cache: KVCache) -> tuple[jax.Array, KVCache]:
    """input_ids, attention_mask: [B, T] -> (hidden [B, T, D], cache advanced by T slots).

    Writes at ``cache.index``; the caller keeps ``index + T <= max_length`` (shapes are static,
    an overflowing write is clamped by ``dynamic_update_slice``, not detected).
    """
    return self._extend(input_ids, attention_mask, cache)

  def decode_step(self, token_ids: jax.Array, cache: KVCache | SharedPrefixCache):
    """token_ids: [B, 1] -> (hidden [B, 1, D], cache advanced by one slot); ``cache`` a ``KVCache``
    or a ``SharedPrefixCache`` (same hidden states, up to float summation order)."""
    if isinstance(cache, SharedPrefixCache):
      return self._decode_shared(token_ids, cache)
    return self._extend(token_ids, jnp.ones(token_ids.shape, jnp.int32), cache)

  def shared_prefix_cache(self, cache: KVCache, rounds: int, new_length: int,
                          dtype: Any = None) -> SharedPrefixCache:
    """The prefilled prompt cache ``cache`` (P rows, every slot a prompt slot or left padding) kept
    once per prompt, with an empty per-row part for ``rounds`` continuations of each prompt of up
    to ``new_length`` tokens: rows [P] -> [P * rounds], prompt-major. Nothing is repeated but the
    [P] positions."""
    cfg = self.config
    rows = cache.batch_size * rounds
    dt = cfg.compute_dtype if dtype is None else (DTYPES[dtype] if isinstance(dtype, str) else dtype)
    v_shape = (rows, cfg.num_key_value_heads, new_length, cfg.head_dim)
    k_shape = (rows, cfg.num_key_value_heads, cfg.head_dim, new_length)  # keys transposed
    if cfg.scan_layers:
      k = jnp.zeros((cfg.num_hidden_layers, *k_shape), dt)
      v = jnp.zeros((cfg.num_hidden_layers, *v_shape), dt)
    else:
      k = tuple(jnp.zeros(k_shape, dt) for _ in range(cfg.num_hidden_layers))
      v = tuple(jnp.zeros(v_shape, dt) for _ in range(cfg.num_hidden_layers))
    return SharedPrefixCache(prefix_k=cache.k, prefix_v=cache.v, prefix_mask=cache.mask,
                             prefix_positions=positions_from_mask(cache.mask), k=k, v=v,
                             index=jnp.zeros((), jnp.int32),
                             positions=jnp.repeat(cache.positions, rounds))

  def _shared_masks(self, cache: SharedPrefixCache) -> tuple[tuple[jax.Array, jax.Array], ...]:
    """((prefix [P, L], new [1, T]),) or, with sliding-window layers, also the windowed pair; the
    query of every round of prompt p sits at position ``positions[p * rounds]``."""
    index = cache.index
    slot = jnp.arange(cache.new_length)
    written = (slot <= index)[None, :]
    full = (cache.prefix_mask, written)
    if not any(self.config.is_sliding):
      return (full,)
    w = self.config.sliding_window
    q_pos = cache.positions[::cache.rounds]  # [P]
    prefix = cache.prefix_mask & ((q_pos[:, None] - cache.prefix_positions) < w)
    return full, (prefix, written & ((index - slot) < w)[None, :])

  def _decode_shared(self, token_ids: jax.Array, cache: SharedPrefixCache):
    """token_ids: [N, 1] -> (hidden [N, 1, D], cache advanced by one new slot)."""
    ropes = self._ropes(cache.positions[:, None])
    index = cache.index.astype(jnp.int32)
    masks = self._shared_masks(cache)
    x = self._embed(token_ids)
    if self.config.scan_layers:
      def run_layer(x, layer, sliding, pk, pv, ck, cv, ropes, masks, index):
        cos, sin = _layer_mask(ropes, sliding)
        x, (ck, cv) = layer(x, cos, sin, _layer_mask(masks, sliding), SharedKV(pk, pv, ck, cv),
                            index)
        return x, ck, cv
      x, new_k, new_v = nnx.scan(
          run_layer, in_axes=(nnx.Carry, 0, 0, 0, 0, 0, 0, None, None, None),
          out_axes=(nnx.Carry, 0, 0), transform_metadata=_SCAN_METADATA,
      )(x, self.layers, jnp.asarray(self.config.is_sliding), cache.prefix_k, cache.prefix_v,
        cache.k, cache.v, ropes, masks, index)
    else:
      new_k, new_v = [], []
      for i, layer in enumerate(self.layers):
        kv = SharedKV(cache.prefix_k[i], cache.prefix_v[i], cache.k[i], cache.v[i])
        sliding = self.config.is_sliding[i]
        cos, sin = _layer_mask(ropes, sliding)
        x, (ck, cv) = layer(x, cos, sin, _layer_mask(masks, sliding), kv, index)
        new_k.append(ck)
        new_v.append(cv)
      new_k, new_v = tuple(new_k), tuple(new_v)
    new_cache = dataclasses.replace(cache, k=new_k, v=new_v, index=index + 1,
                                    positions=cache.positions + 1)
    return self.norm(x), new_cache

  def _extend(self, input_ids, attention_mask, cache: KVCache):
    t = input_ids.shape[1]
    s = cache.max_length
    real = attention_mask.astype(bool)
    positions = cache.positions[:, None] + positions_from_mask(attention_mask)
    ropes = self._ropes(positions)
    index = cache.index.astype(jnp.int32)
    slot_mask = jax.lax.dynamic_update_slice(cache.mask, real, (jnp.zeros((), jnp.int32), index))
    q_slot = index + jnp.arange(t)
    k_slot = jnp.arange(s)
    # Each row's tokens fill its slots in order from position 0, so a real slot's position is the
    # number of real slots before it.
    masks = self._masks(slot_mask[:, None, :] & (k_slot[None, None, :] <= q_slot[None, :, None]),
                        (k_slot[None, None, :] == q_slot[None, :, None]), positions,
                        positions_from_mask(slot_mask))
    x = self._embed(input_ids)
    if self.config.scan_layers:
      def run_layer(x, layer, sliding, ck, cv, ropes, masks, index):
        cos, sin = _layer_mask(ropes, sliding)
        x, (ck, cv) = layer(x, cos, sin, _layer_mask(masks, sliding), (ck, cv), index)
        return x, ck, cv
      x, new_k, new_v = nnx.scan(
          run_layer, in_axes=(nnx.Carry, 0, 0, 0, 0, None, None, None),
          out_axes=(nnx.Carry, 0, 0), transform_metadata=_SCAN_METADATA,
      )(x, self.layers, jnp.asarray(self.config.is_sliding), cache.k, cache.v, ropes, masks,
        index)
    else:
      new_k, new_v = [], []
      for i, layer in enumerate(self.layers):
        sliding = self.config.is_sliding[i]
        cos, sin = _layer_mask(ropes, sliding)
        x, (ck, cv) = layer(x, cos, sin, _layer_mask(masks, sliding), (cache.k[i], cache.v[i]),
                            index)
        new_k.append(ck)
        new_v.append(cv)
      new_k, new_v = tuple(new_k), tuple(new_v)
    new_cache = KVCache(k=new_k, v=new_v, mask=slot_mask, index=index + t,
                        positions=cache.positions + real.sum(axis=1, dtype=jnp.int32))
    return self.norm(x), new_cache
