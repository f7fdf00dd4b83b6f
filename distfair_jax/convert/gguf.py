"""A GGUF file (llama.cpp's format) -> a converted directory, for the llama, qwen3 and gemma3
architectures.

  gguf_to_flax("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2", dtype="float32")
  distfair convert gguf-to-flax SmolLM2-135M-Instruct.Q4_1.gguf smollm2 --dtype float32

The output is the directory ``convert.hf_to_flax`` writes (params/, model_config.json, tokenizer
files), so ``model.checkpoint``, ``load_pretrained`` and ``flax_to_hf`` use it like any other.

What is read, and how it matches transformers' own GGUF loading
(``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)``, ``modeling_gguf_pytorch_utils``):

- Header and metadata with ``gguf.GGUFReader``; tensor bytes straight from the file, one block of
  rows at a time (so a file's pages never pile up in the process's memory).
- Weights dequantized to float32 with ``gguf.quants.dequantize`` (what transformers calls), then
  cast to the target dtype. Types: :data:`SUPPORTED_TYPES`; any other is an ``InputError``.
- Names: ``token_embd``, ``blk.N.attn_{q,k,v,output}``, ``blk.N.ffn_{gate,up,down}``,
  ``blk.N.attn_norm``, ``blk.N.ffn_norm``, ``output_norm``, ``output``; qwen3 and gemma3 add
  ``blk.N.attn_{q,k}_norm`` (QK-norm), gemma3 ``blk.N.post_attention_norm`` and
  ``blk.N.post_ffw_norm``, its ``ffn_norm`` being Gemma's pre-feedforward norm (see
  :func:`gguf_name` and :data:`ARCHS`). A dequantized GGUF weight is ``[out, in]``, the Hugging
  Face layout; our kernels are its transpose.
- q/k rows (llama only): llama.cpp's converter interleaves the two RoPE halves of every head; they
  are put back with transformers' ``_reverse_permute_weights`` (see :func:`unpermute_rows`).
- gemma3 norms: llama.cpp stores Gemma's ``(1 + w)`` norm weights as ``1 + w``; 1 is subtracted
  in float32, as transformers' ``Gemma2TensorProcessor`` does.
- Config from ``<arch>.*`` keys: block_count, embedding_length, feed_forward_length,
  attention.head_count[_kv], attention.layer_norm_rms_epsilon, rope.freq_base, context_length,
  attention.key_length or rope.dimension_count (the head dim; else the q rows per head); vocab_size
  = the embedding's rows (the token list's length); embeddings tied when there is no
  ``output.weight``; bos / eos / pad ids from ``tokenizer.ggml.*``. gemma3, as llama.cpp reads it:
  attention.sliding_window, five sliding layers to one global, RoPE base 10000 on the sliding
  layers, ``query_pre_attn_scalar`` the head dim (hidden / heads for the 62-layer 27B),
  final_logit_softcapping when the file has it, a linear ``rope.scaling`` on the global layers
  (transformers' GGUF loading ignores that one; llama.cpp and the original checkpoints apply it;
  the 270M and 1B have none).
- Tokenizer: transformers' ``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` (its GGUF
  tokenizer conversion, which needs torch), saved with the chat template in tokenizer_config.json;
  generation_config.json gets the bos / eos / pad ids.

Refused with a one-line ``InputError``: a Git LFS pointer, a non-GGUF or truncated file, another
architecture, a mixture of experts, RoPE scaling (``<arch>.rope.scaling.type`` other than gemma3's
linear, or a ``rope_freqs`` tensor: transformers ignores both, which changes every logit), a head
dim that differs from the rotary dim, missing / unexpected / misshapen tensors. Where this differs
from transformers: a file without ``llama.attention.head_count_kv`` is read as llama.cpp reads it
(as many KV heads as heads, q and k unpermuted), while transformers then leaves q and k permuted;
a qwen3 file's head dim is its ``attention.key_length`` (transformers reads none and assumes 128,
the head dim of every released Qwen3); gemma3's linear RoPE scaling (above).

Memory: the converted copy in the target dtype plus one block of rows (~64 MiB as float32), as
``hf_to_flax``. The output goes through ``fileio.atomic_dir``: a killed run leaves nothing at DST.
"""

from __future__ import annotations

import dataclasses
import gc
import os
from pathlib import Path
from typing import Any

import numpy as np

from distfair_jax import fileio
from distfair_jax.convert.hf import (MODEL_CONFIG, PARAMS_DIR, _abstract_params, _check_dtype,
                                  _config_from_hf, _nest, _np_dtype, _progress,
                                  _write_model_config)
from distfair_jax.errors import InputError
from distfair_jax.model import checkpoint_io

__all__ = ["gguf_to_flax", "gguf_name", "read_config", "unpermute_rows", "SUPPORTED_TYPES",
           "ARCHS", "GGUFArch"]

# What gguf.quants.dequantize reads and the tests cover (synthetic files of every type).
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K",
                   "Q4_K", "Q5_K", "Q6_K")
_LFS_PREFIX = b"version https://git-lfs.github.com/spec/"
_MAGIC = b"GGUF"
_CHUNK_BYTES = 64 * 2**20  # float32 bytes of one block of rows
# Our module path inside a decoder layer -> llama.cpp's tensor name inside blk.N.
_LAYER_NAMES = {
    ("self_attn", "q_proj"): "attn_q", ("self_attn", "k_proj"): "attn_k",
    ("self_attn", "v_proj"): "attn_v", ("self_attn", "o_proj"): "attn_output",
    ("mlp", "gate_proj"): "ffn_gate", ("mlp", "up_proj"): "ffn_up",
    ("mlp", "down_proj"): "ffn_down",
    ("input_layernorm",): "attn_norm", ("post_attention_layernorm",): "ffn_norm",
}
_QK_NORM_NAMES = {("self_attn", "q_norm"): "attn_q_norm", ("self_attn", "k_norm"): "attn_k_norm"}
# Gemma's four norms: its post_attention_layernorm normalises the attention output.
_GEMMA3_NAMES = {**_LAYER_NAMES, **_QK_NORM_NAMES,
                 ("post_attention_layernorm",): "post_attention_norm",
                 ("pre_feedforward_layernorm",): "ffn_norm",
                 ("post_feedforward_layernorm",): "post_ffw_norm"}


@dataclasses.dataclass(frozen=True)
class GGUFArch:
  """What differs per GGUF architecture: the Hugging Face architecture and model_type it becomes,
  the decoder layer's tensor names, whether llama.cpp permuted the q/k rows, what it added to the
  norm weights (Gemma's ``1 + w``), and the RoPE scaling types it may carry."""

  architecture: str
  model_type: str
  layer_names: dict
  permuted_qk: bool = False
  norm_offset: float = 0.0
  rope_scaling: tuple[str, ...] = ()


ARCHS = {
    "llama": GGUFArch("LlamaForCausalLM", "llama", _LAYER_NAMES, permuted_qk=True),
    "qwen3": GGUFArch("Qwen3ForCausalLM", "qwen3", {**_LAYER_NAMES, **_QK_NORM_NAMES}),
    "gemma3": GGUFArch("Gemma3ForCausalLM", "gemma3_text", _GEMMA3_NAMES, norm_offset=1.0,
                       rope_scaling=("linear",)),
}
# llama.cpp's fixed Gemma 3 settings (llama-model.cpp): every 6th layer global, the sliding
# layers' RoPE base, and the 27B (62 layers) scaling queries by hidden / heads.
_GEMMA3_PATTERN, _GEMMA3_LOCAL_BASE, _GEMMA3_27B_LAYERS = 6, 10000.0, 62
_TOP_NAMES = {("embed_tokens",): "token_embd", ("norm",): "output_norm", ("lm_head",): "output"}
_LEAF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}

Path_ = tuple  # a parameter path in the NNX state: ("layers", 3, "self_attn", "q_proj", "kernel")


def _gguf_module():
  try:
    import gguf
  except ImportError as e:
    raise InputError(f"gguf-to-flax: gguf: expected the gguf package (pip install "
                     f"'distfair_jax[gguf]'), got ImportError: {e}") from None
  return gguf


# ---------------------------------------------------------------------------------------------
# Names


def gguf_name(path: Path_, arch: str = "llama") -> str:
  """NNX parameter path -> llama.cpp tensor name of the GGUF architecture ``arch``.

  ("layers", 3, "self_attn", "q_proj", "kernel") -> "blk.3.attn_q.weight";
  ("embed_tokens", "embedding") -> "token_embd.weight"; ("lm_head", "kernel") -> "output.weight";
  ("layers", 3, "pre_feedforward_layernorm", "scale") -> "blk.3.ffn_norm.weight" (gemma3).
  """
  *modules, leaf = path
  modules = tuple(modules)
  names = ARCHS[arch].layer_names
  if leaf not in _LEAF:
    raise ValueError(f"no GGUF name for parameter {path}")
  if modules[:1] == ("layers",) and modules[2:] in names:
    return f"blk.{int(modules[1])}.{names[modules[2:]]}.{_LEAF[leaf]}"
  if modules in _TOP_NAMES:
    return f"{_TOP_NAMES[modules]}.{_LEAF[leaf]}"
  raise ValueError(f"no GGUF name for parameter {path}")


def unpermute_rows(rows: int, n_head: int) -> np.ndarray:
  """Row order ``[rows]`` that undoes llama.cpp's q/k permutation: ``hf = gguf[order]``.

  llama.cpp stores each head's rows as (dim, 2) pairs, the two RoPE halves interleaved; transformers
  (``LlamaTensorProcessor._reverse_permute_weights``) restores (2, dim): ``w.reshape(n_head, dim, 2,
  ...).swapaxes(2, 1)``, here as a row gather so that it applies to any block of whole heads.
  """
  dim = rows // n_head // 2
  return np.arange(rows).reshape(n_head, dim, 2).swapaxes(2, 1).reshape(rows)


# ---------------------------------------------------------------------------------------------
# Opening and metadata


def _check_file(file: Path) -> None:
  """InputError unless ``file`` starts like a GGUF file (a Git LFS pointer named as such)."""
  if not file.is_file():
    raise InputError(f"{file}: file: expected a GGUF file, got "
                     f"{'a directory' if file.is_dir() else 'no such file'}")
  with open(file, "rb") as f:
    head = f.read(len(_LFS_PREFIX))
  if head.startswith(_LFS_PREFIX):
    raise InputError(f"{file}: file: expected a GGUF file, got a Git LFS pointer, not the file "
                     "(fetch the file itself, e.g. `git lfs pull`)")
  if not head.startswith(_MAGIC):
    raise InputError(f"{file}: file: expected a GGUF file (starting with the bytes 'GGUF'), got "
                     f"not a GGUF file (it starts with {head[:4]!r})")


def _open(file: Path):
  """A ``gguf.GGUFReader`` of ``file`` (headers only are read here); one-line InputError for a
  file that is not GGUF, truncated or big-endian."""
  gguf = _gguf_module()
  _check_file(file)
  try:
    reader = gguf.GGUFReader(str(file))
  except Exception as e:  # the reader raises ValueError / struct errors / reshape errors
    raise InputError(f"{file}: header: expected a complete GGUF file, got an unreadable or "
                     f"truncated one ({type(e).__name__}: {e})") from None
  if getattr(reader, "byte_order", "I") != "I":
    raise InputError(f"{file}: header: expected a little-endian GGUF file, got a big-endian one")
  return reader


def _meta(reader, key: str, default: Any = None) -> Any:
  """The value of metadata field ``key`` (a scalar, a string or a list), or ``default``."""
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def _int_field(reader, file: Path, key: str, default: Any = None) -> int | None:
  value = _meta(reader, key, default)
  if value is None and default is None:
    raise InputError(f"{file}: {key}: expected a positive integer, got nothing")
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
    raise InputError(f"{file}: {key}: expected a positive integer, got {value!r}")
  return int(value)


def _float_field(reader, file: Path, key: str, default: float) -> float:
  value = _meta(reader, key, default)
  if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or value <= 0:
    raise InputError(f"{file}: {key}: expected a positive number, got {value!r}")
  return float(value)


def _check_arch(reader, file: Path) -> str:
  """The file's architecture (a key of ``ARCHS``); InputError for what this converter cannot
  represent exactly."""
  arch = _meta(reader, "general.architecture")
  if arch not in ARCHS:
    raise InputError(f"{file}: general.architecture: expected one of {', '.join(ARCHS)} (the GGUF "
                     f"architectures converted), got {arch!r}")
  experts = _meta(reader, f"{arch}.expert_count", 0)
  if experts:
    raise InputError(f"{file}: {arch}.expert_count: expected a dense {arch} model (0 experts), "
                     f"got a mixture of {experts} experts")
  scaling = _meta(reader, f"{arch}.rope.scaling.type", "none")
  if scaling != "none" and scaling not in ARCHS[arch].rope_scaling:
    expected = " or ".join(("none", *ARCHS[arch].rope_scaling))
    raise InputError(f"{file}: {arch}.rope.scaling.type: expected {expected} (RoPE scaling is "
                     f"not read from GGUF), got {scaling!r}")
  if any(t.name == "rope_freqs.weight" for t in reader.tensors):
    raise InputError(f"{file}: rope_freqs.weight: expected no RoPE frequency factors (RoPE scaling "
                     f"is not read from GGUF, e.g. Llama 3.1's), got the tensor")
  return arch


def _head_dim(reader, file: Path, arch: str, hidden: int, heads: int) -> int:
  """attention.key_length, else rope.dimension_count, else the rows of ``blk.0.attn_q`` per head
  (Qwen3's head dim is not hidden / heads), else hidden / heads; the rotary dim must be the whole
  head."""
  rope_dim = _meta(reader, f"{arch}.rope.dimension_count")
  key_len = _meta(reader, f"{arch}.attention.key_length")
  q = next((t for t in reader.tensors if t.name == "blk.0.attn_q.weight"), None)
  from_q = int(q.shape[1]) // heads if q is not None and len(q.shape) == 2 else None
  head_dim = key_len or rope_dim or from_q or (hidden // heads)
  if rope_dim is not None and rope_dim != head_dim:
    raise InputError(f"{file}: {arch}.rope.dimension_count: expected the head dim {head_dim} "
                     f"(partial rotary embeddings are not supported), got {rope_dim}")
  value_len = _meta(reader, f"{arch}.attention.value_length")
  if value_len is not None and value_len != head_dim:
    raise InputError(f"{file}: {arch}.attention.value_length: expected the key length "
                     f"{head_dim}, got {value_len}")
  return head_dim


def _gemma3_config(reader, file: Path, hf: dict[str, Any]) -> dict[str, Any]:
  """The Gemma 3 fields llama.cpp reads or fixes (see the module docstring)."""
  layers, head_dim = hf["num_hidden_layers"], hf["head_dim"]
  scalar = (hf["hidden_size"] // hf["num_attention_heads"] if layers == _GEMMA3_27B_LAYERS
            else head_dim)
  out = {"hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": scalar,
         "sliding_window": _int_field(reader, file, "gemma3.attention.sliding_window"),
         "layer_types": ["sliding_attention" if (i + 1) % _GEMMA3_PATTERN else "full_attention"
                         for i in range(layers)],
         "rope_local_base_freq": _GEMMA3_LOCAL_BASE, "attn_logit_softcapping": None,
         "final_logit_softcapping": (_float_field(reader, file, "gemma3.final_logit_softcapping",
                                                  None)
                                     if "gemma3.final_logit_softcapping" in reader.fields
                                     else None)}
  if _meta(reader, "gemma3.rope.scaling.type", "none") == "linear":
    out["rope_scaling"] = {"rope_type": "linear", "factor": _float_field(
        reader, file, "gemma3.rope.scaling.factor", None)}
  return out


def _vocab_size(reader, file: Path, arch: str) -> int:
  """Rows of ``token_embd.weight``, checked against llama.vocab_size and the token list."""
  embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
  if embed is None or len(embed.shape) != 2:
    raise InputError(f"{file}: token_embd.weight: expected the [hidden, vocab] embedding tensor, "
                     f"got {'none' if embed is None else list(embed.shape)}")
  rows = int(embed.shape[1])
  declared = _meta(reader, f"{arch}.vocab_size")
  if declared is not None and declared != rows:
    raise InputError(f"{file}: {arch}.vocab_size: expected the embedding's {rows} rows, got "
                     f"{declared}")
  tokens = reader.fields.get("tokenizer.ggml.tokens")
  if tokens is not None and len(tokens.data) > rows:
    raise InputError(f"{file}: tokenizer.ggml.tokens: expected at most the embedding's {rows} "
                     f"rows, got {len(tokens.data)} tokens")
  return rows


def _hf_config(reader, file: Path) -> dict[str, Any]:
  """The Hugging Face config dict the GGUF metadata describes."""
  arch = _check_arch(reader, file)
  hidden = _int_field(reader, file, f"{arch}.embedding_length")
  heads = _int_field(reader, file, f"{arch}.attention.head_count")
  kv_heads = _int_field(reader, file, f"{arch}.attention.head_count_kv", heads)
  hf: dict[str, Any] = {
      "architectures": [ARCHS[arch].architecture], "model_type": ARCHS[arch].model_type,
      "vocab_size": _vocab_size(reader, file, arch), "hidden_size": hidden,
      "intermediate_size": _int_field(reader, file, f"{arch}.feed_forward_length"),
      "num_hidden_layers": _int_field(reader, file, f"{arch}.block_count"),
      "num_attention_heads": heads, "num_key_value_heads": kv_heads,
      "head_dim": _head_dim(reader, file, arch, hidden, heads),
      "rms_norm_eps": _float_field(reader, file, f"{arch}.attention.layer_norm_rms_epsilon",
                                   1e-6),
      "rope_theta": _float_field(reader, file, f"{arch}.rope.freq_base", 10000.0),
      "max_position_embeddings": _int_field(reader, file, f"{arch}.context_length", 2048),
      "tie_word_embeddings": all(t.name != "output.weight" for t in reader.tensors),
  }
  if arch == "gemma3":
    hf.update(_gemma3_config(reader, file, hf))
  for ours, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                    ("pad_token_id", "padding_token_id")):
    value = _meta(reader, f"tokenizer.ggml.{key}")
    if value is not None:
      hf[ours] = int(value)
  return hf


def read_config(src: str | os.PathLike, dtype: str = "float32"):
  """The ``LlamaConfig`` a GGUF file describes (metadata only; no tensor is read)."""
  file = Path(src).absolute()
  return _config_from_hf(_hf_config(_open(file), file), file, dtype=dtype, param_dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Tensors


@dataclasses.dataclass(frozen=True)
class _TensorInfo:
  """Where one tensor's bytes are: what the reader found, without the reader (whose per-token
  metadata objects take ~160 MiB for a 49k vocabulary)."""
  name: str
  qtype: Any             # gguf.GGMLQuantizationType
  shape: tuple[int, ...]  # GGUF order, fastest dim first: [in, out] for a weight
  offset: int            # of the data in the file, in bytes
  item: np.dtype         # stored item: float32 / float16, or uint8 bytes of quantized blocks
  stored: tuple[int, ...]  # [rows, items per row] (or [n]) of stored items
  n_bytes: int


def _tensor_infos(reader) -> dict[str, _TensorInfo]:
  return {t.name: _TensorInfo(t.name, t.tensor_type, tuple(int(d) for d in t.shape),
                              int(t.data_offset), np.dtype(t.data.dtype),
                              tuple(int(d) for d in t.data.shape), int(t.n_bytes))
          for t in reader.tensors}


def _gguf_arch(config) -> str:
  """The GGUF architecture of ``config``'s model."""
  return next(a for a, spec in ARCHS.items() if spec.architecture == config.architecture)


def _plan(config, tensors: dict[str, _TensorInfo], file: Path
          ) -> list[tuple[Path_, _TensorInfo, bool, int | None, float]]:
  """[(our path, GGUF tensor, transposed, q/k head count or None, offset to subtract)] for every
  parameter, checked: each expected tensor present with its shape and a supported type, nothing
  unexpected."""
  arch = _gguf_arch(config)
  spec = ARCHS[arch]
  plan, expected = [], set()
  for path, leaf in _abstract_params(config).items():
    name = gguf_name(path, arch)
    expected.add(name)
    if name not in tensors:
      raise InputError(f"{file}: {name}: expected tensor (for {'.'.join(map(str, path))}), got "
                       "none")
    tensor, transposed = tensors[name], path[-1] == "kernel"
    # GGUF lists dims fastest first ([in, out] for a weight): our kernel's shape, the reverse of
    # our embedding's.
    want = tuple(leaf.shape) if transposed else tuple(leaf.shape)[::-1]
    if tensor.shape != want:
      raise InputError(f"{file}: {name}: expected shape {list(want)} (GGUF order), got "
                       f"{list(tensor.shape)}")
    if tensor.qtype.name not in SUPPORTED_TYPES:
      raise InputError(f"{file}: {name}: expected a tensor type gguf-to-flax dequantizes "
                       f"({', '.join(SUPPORTED_TYPES)}), got {tensor.qtype.name}")
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    n_head = heads.get(path[-2]) if transposed and spec.permuted_qk else None
    offset = spec.norm_offset if path[-1] == "scale" else 0.0
    plan.append((path, tensor, transposed, n_head, offset))
  extra = sorted(n for n in tensors if n not in expected)
  if extra:
    more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
    raise InputError(f"{file}: {extra[0]}: expected only the tensors of a {arch} model, got "
                     f"unexpected tensors: {', '.join(extra[:5])}{more}")
  return plan


def _read_items(f, tensor: _TensorInfo, start: int, count: int) -> np.ndarray:
  """``count`` stored items of ``tensor`` from item ``start`` on (a flat array)."""
  f.seek(tensor.offset + start * tensor.item.itemsize)
  items = np.fromfile(f, dtype=tensor.item, count=count)
  if items.size != count:
    raise InputError(f"{f.name}: {tensor.name}: expected {tensor.n_bytes} bytes of tensor data, "
                     "got a truncated file")
  return items


def _read_tensor(f, tensor: _TensorInfo, transposed: bool, n_head: int | None,
                 dtype: np.dtype, offset: float = 0.0) -> np.ndarray:
  """One GGUF tensor dequantized into a new C-contiguous array of ``dtype``: ``[in, out]`` for a
  kernel (``transposed``), else as dequantized (``[vocab, hidden]``, ``[hidden]``); q/k rows
  un-permuted for ``n_head`` heads; a 1-D tensor minus ``offset`` (in float32: Gemma's norms).
  Reads blocks of whole heads of at most ~64 MiB as float32."""
  from gguf.quants import dequantize
  if len(tensor.stored) == 1:
    values = dequantize(_read_items(f, tensor, 0, tensor.stored[0]), tensor.qtype).reshape(-1)
    values = values.astype(np.float32) - np.float32(offset) if offset else values
    return np.ascontiguousarray(values, dtype=dtype)
  rows, cols = tensor.shape[::-1]
  row_items = tensor.stored[1]
  out = np.empty((cols, rows) if transposed else (rows, cols), dtype)
  group = rows // n_head if n_head else 1  # rows of one head: blocks hold whole heads
  step = max(group, (_CHUNK_BYTES // (4 * cols)) // group * group)
  order = unpermute_rows(rows, n_head) if n_head else None
  for r0 in range(0, rows, step):
    r1 = min(rows, r0 + step)
    stored = _read_items(f, tensor, r0 * row_items, (r1 - r0) * row_items)
    block = dequantize(stored.reshape(r1 - r0, row_items), tensor.qtype).reshape(r1 - r0, cols)
    if order is not None:
      block = block[order[r0:r1] - r0]
    if transposed:
      out[:, r0:r1] = block.T
    else:
      out[r0:r1] = block
    del block
  return out


# ---------------------------------------------------------------------------------------------
# Tokenizer


def _check_tokenizer_metadata(reader, file: Path) -> None:
  if "tokenizer.ggml.tokens" not in reader.fields:
    raise InputError(f"{file}: tokenizer.ggml.tokens: expected the tokenizer's vocabulary in the "
                     "metadata, got none")


def _save_tokenizer(file: Path, config, dst) -> None:
  """transformers' tokenizer of the GGUF file (the GGUF route of ``AutoTokenizer``) saved into
  ``dst``: tokenizer.json, tokenizer_config.json (with the chat template), generation_config.json
  (the bos / eos / pad ids of ``config``)."""
  try:
    import torch  # noqa: F401  (transformers' GGUF metadata reader imports it)
  except ImportError as e:
    raise InputError(f"gguf-to-flax: torch: expected torch installed (transformers' GGUF "
                     f"tokenizer conversion imports it: pip install 'distfair_jax[gguf]'), got "
                     f"ImportError: {e}") from None
  from transformers import AutoTokenizer
  try:
    tok = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name,
                                        local_files_only=True)
  except Exception as e:  # transformers raises ValueError / KeyError for what it cannot build
    raise InputError(f"{file}: tokenizer.ggml.model: expected a tokenizer transformers builds "
                     f"from GGUF metadata, got {type(e).__name__}: {e}") from None
  for key in ("is_local", "local_files_only"):  # how it was loaded here, not the tokenizer's
    tok.init_kwargs.pop(key, None)
  tok.save_pretrained(str(dst), save_jinja_files=False)
  ids = {k: getattr(config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
         if getattr(config, k) is not None}
  if ids:
    fileio.write_json(dst / "generation_config.json", ids)


# ---------------------------------------------------------------------------------------------
# GGUF -> flax


def gguf_to_flax(src: str | os.PathLike, dst: str | os.PathLike, dtype: str = "bfloat16", *,
                 overwrite: bool = False, progress: bool = False) -> Path:
  """Converts a llama, qwen3 or gemma3 GGUF file into a converted directory at ``dst`` (see the
  module docstring), parameters dequantized and cast to ``dtype``. Streams one tensor at a time:
  peak memory is one model copy in ``dtype`` plus a block of rows. Raises ``InputError`` (one line)
  for a bad file or an existing non-empty ``dst`` without ``overwrite``; nothing is left at
  ``dst`` unless the conversion completes. Returns ``dst``."""
  _check_dtype(dtype)
  file, dst = Path(src).absolute(), Path(dst).absolute()
  fileio.check_new_dir(dst, overwrite)
  reader = _open(file)
  hf = _hf_config(reader, file)
  _check_tokenizer_metadata(reader, file)
  tensors = _tensor_infos(reader)
  del reader  # its metadata objects are not needed from here on
  config = _config_from_hf(hf, file, dtype=dtype, param_dtype=dtype)
  plan = _plan(config, tensors, file)
  target = _np_dtype(dtype)

  with fileio.atomic_dir(dst, overwrite=overwrite) as tmp:
    _save_tokenizer(file, config, tmp)  # first: a tokenizer it cannot build fails in seconds
    gc.collect()  # the tokenizer and both readers' metadata, before the weights take their place
    flat: dict[Path_, np.ndarray] = {}
    with open(file, "rb") as f:
      for path, tensor, transposed, n_head, offset in _progress(plan, len(plan), "converting",
                                                                 progress):
        flat[path] = _read_tensor(f, tensor, transposed, n_head, target, offset)
    tree = _nest(flat)
    del flat
    checkpoint_io.save_params(tmp / PARAMS_DIR, tree)
    del tree
    _write_model_config(tmp / MODEL_CONFIG, config)
  return dst
