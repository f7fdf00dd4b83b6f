"""A GGUF file (llama.cpp's format) -> a converted directory, for the llama architecture.

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
  ``blk.N.attn_norm``, ``blk.N.ffn_norm``, ``output_norm``, ``output`` (see :func:`gguf_name`). A
  dequantized GGUF weight is ``[out, in]``, the Hugging Face layout; our kernels are its transpose.
- q/k rows: llama.cpp's converter interleaves the two RoPE halves of every head; they are put back
  with transformers' ``_reverse_permute_weights`` (see :func:`unpermute_rows`).
- Config from ``llama.*`` keys: block_count, embedding_length, feed_forward_length,
  attention.head_count[_kv], attention.layer_norm_rms_epsilon, rope.freq_base, context_length,
  rope.dimension_count (the head dim); vocab_size = the embedding's rows (the token list's length);
  embeddings tied when there is no ``output.weight``; bos / eos / pad ids from ``tokenizer.ggml.*``.
- Tokenizer: transformers' ``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` (its GGUF
  tokenizer conversion, which needs torch), saved with the chat template in tokenizer_config.json;
  generation_config.json gets the bos / eos / pad ids.

Refused with a one-line ``InputError``: a Git LFS pointer, a non-GGUF or truncated file, another
architecture, a mixture of experts, RoPE scaling (``llama.rope.scaling.type`` or a ``rope_freqs``
tensor: transformers ignores both, which changes every logit), a head dim that differs from the
rotary dim, missing / unexpected / misshapen tensors. One place where this differs from
transformers: a file without ``llama.attention.head_count_kv`` is read as llama.cpp reads it (as
many KV heads as heads, q and k unpermuted), while transformers then leaves q and k permuted.

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
from distfair_jax.convert import (MODEL_CONFIG, PARAMS_DIR, _abstract_params, _check_dtype,
                                  _config_from_hf, _nest, _np_dtype, _progress,
                                  _write_model_config)
from distfair_jax.errors import InputError

__all__ = ["gguf_to_flax", "gguf_name", "read_config", "unpermute_rows", "SUPPORTED_TYPES"]

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


def gguf_name(path: Path_) -> str:
  """NNX parameter path -> llama.cpp tensor name.

  ("layers", 3, "self_attn", "q_proj", "kernel") -> "blk.3.attn_q.weight";
  ("embed_tokens", "embedding") -> "token_embd.weight"; ("lm_head", "kernel") -> "output.weight".
  """
  *modules, leaf = path
  modules = tuple(modules)
  if leaf not in _LEAF:
    raise ValueError(f"no GGUF name for parameter {path}")
  if modules[:1] == ("layers",) and modules[2:] in _LAYER_NAMES:
    return f"blk.{int(modules[1])}.{_LAYER_NAMES[modules[2:]]}.{_LEAF[leaf]}"
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


def _check_llama(reader, file: Path) -> None:
  """InputError for what this converter cannot represent exactly."""
  arch = _meta(reader, "general.architecture")
  if arch != "llama":
    raise InputError(f"{file}: general.architecture: expected llama (the only GGUF architecture "
                     f"converted), got {arch!r}")
  experts = _meta(reader, "llama.expert_count", 0)
  if experts:
    raise InputError(f"{file}: llama.expert_count: expected a dense llama model (0 experts), got "
                     f"a mixture of {experts} experts")
  scaling = _meta(reader, "llama.rope.scaling.type", "none")
  if scaling != "none":
    raise InputError(f"{file}: llama.rope.scaling.type: expected none (RoPE scaling is not read "
                     f"from GGUF), got {scaling!r}")
  if any(t.name == "rope_freqs.weight" for t in reader.tensors):
    raise InputError(f"{file}: rope_freqs.weight: expected no RoPE frequency factors (RoPE scaling "
                     f"is not read from GGUF, e.g. Llama 3.1's), got the tensor")


def _head_dim(reader, file: Path, hidden: int, heads: int) -> int:
  """attention.key_length, else rope.dimension_count, else hidden / heads; the rotary dim must be
  the whole head."""
  rope_dim = _meta(reader, "llama.rope.dimension_count")
  key_len = _meta(reader, "llama.attention.key_length")
  head_dim = key_len or rope_dim or (hidden // heads)
  if rope_dim is not None and rope_dim != head_dim:
    raise InputError(f"{file}: llama.rope.dimension_count: expected the head dim {head_dim} "
                     f"(partial rotary embeddings are not supported), got {rope_dim}")
  value_len = _meta(reader, "llama.attention.value_length")
  if value_len is not None and value_len != head_dim:
    raise InputError(f"{file}: llama.attention.value_length: expected the key length "
                     f"{head_dim}, got {value_len}")
  return head_dim


def _vocab_size(reader, file: Path) -> int:
  """Rows of ``token_embd.weight``, checked against llama.vocab_size and the token list."""
  embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
  if embed is None or len(embed.shape) != 2:
    raise InputError(f"{file}: token_embd.weight: expected the [hidden, vocab] embedding tensor, "
                     f"got {'none' if embed is None else list(embed.shape)}")
  rows = int(embed.shape[1])
  declared = _meta(reader, "llama.vocab_size")
  if declared is not None and declared != rows:
    raise InputError(f"{file}: llama.vocab_size: expected the embedding's {rows} rows, got "
                     f"{declared}")
  tokens = reader.fields.get("tokenizer.ggml.tokens")
  if tokens is not None and len(tokens.data) > rows:
    raise InputError(f"{file}: tokenizer.ggml.tokens: expected at most the embedding's {rows} "
                     f"rows, got {len(tokens.data)} tokens")
  return rows


def _hf_config(reader, file: Path) -> dict[str, Any]:
  """The Hugging Face config dict the GGUF metadata describes (llama only)."""
  _check_llama(reader, file)
  hidden = _int_field(reader, file, "llama.embedding_length")
  heads = _int_field(reader, file, "llama.attention.head_count")
  kv_heads = _int_field(reader, file, "llama.attention.head_count_kv", heads)
  hf: dict[str, Any] = {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "vocab_size": _vocab_size(reader, file), "hidden_size": hidden,
      "intermediate_size": _int_field(reader, file, "llama.feed_forward_length"),
      "num_hidden_layers": _int_field(reader, file, "llama.block_count"),
      "num_attention_heads": heads, "num_key_value_heads": kv_heads,
      "head_dim": _head_dim(reader, file, hidden, heads),
      "rms_norm_eps": _float_field(reader, file, "llama.attention.layer_norm_rms_epsilon", 1e-6),
      "rope_theta": _float_field(reader, file, "llama.rope.freq_base", 10000.0),
      "max_position_embeddings": _int_field(reader, file, "llama.context_length", 2048),
      "tie_word_embeddings": all(t.name != "output.weight" for t in reader.tensors),
  }
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


def _plan(config, tensors: dict[str, _TensorInfo], file: Path
          ) -> list[tuple[Path_, _TensorInfo, bool, int | None]]:
  """[(our path, GGUF tensor, transposed, q/k head count or None)] for every parameter, checked:
  each expected tensor present with its shape and a supported type, nothing unexpected."""
  plan, expected = [], set()
  for path, leaf in _abstract_params(config).items():
    name = gguf_name(path)
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
    n_head = heads.get(path[-2]) if transposed else None
    plan.append((path, tensor, transposed, n_head))
  extra = sorted(n for n in tensors if n not in expected)
  if extra:
    more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
    raise InputError(f"{file}: {extra[0]}: expected only the tensors of a llama model, got "
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
                 dtype: np.dtype) -> np.ndarray:
  """One GGUF tensor dequantized into a new C-contiguous array of ``dtype``: ``[in, out]`` for a
  kernel (``transposed``), else as dequantized (``[vocab, hidden]``, ``[hidden]``); q/k rows
  un-permuted for ``n_head`` heads. Reads blocks of whole heads of at most ~64 MiB as float32."""
  from gguf.quants import dequantize
  if len(tensor.stored) == 1:
    values = dequantize(_read_items(f, tensor, 0, tensor.stored[0]), tensor.qtype).reshape(-1)
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
  """Converts a llama GGUF file into a converted directory at ``dst`` (see the module
  docstring), parameters dequantized and cast to ``dtype``. Streams one tensor at a time: peak
  memory is one model copy in ``dtype`` plus a block of rows. Raises ``InputError`` (one line)
  for a bad file or an existing non-empty ``dst`` without ``overwrite``; nothing is left at
  ``dst`` unless the conversion completes. Returns ``dst``."""
  from distfair_jax.checkpoint_io import save_params
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
      for path, tensor, transposed, n_head in _progress(plan, len(plan), "converting", progress):
        flat[path] = _read_tensor(f, tensor, transposed, n_head, target)
    tree = _nest(flat)
    del flat
    save_params(tmp / PARAMS_DIR, tree)
    del tree
    _write_model_config(tmp / MODEL_CONFIG, config)
  return dst
