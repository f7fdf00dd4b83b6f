"""Hugging Face <-> distfair checkpoints: safetensors in, safetensors out; no pickle is ever loaded.

A converted directory (written by :func:`hf_to_flax` and :func:`save_pretrained`, read by
:func:`flax_to_hf`, ``model.loader.load_model`` (training's ``model.checkpoint``, evaluation) and
``model.loader.load_pretrained``)::

  DST/params/              orbax checkpoint of the NNX parameter tree (see model/checkpoint_io.py)
  DST/model_config.json    the model config: Hugging Face config fields (``LlamaConfig.to_hf()``)
                           plus a "distfair" entry with dtype / param_dtype / remat
  DST/tokenizer*.json ...  the source's tokenizer files and generation_config.json, copied unchanged

Parameter names map one to one: HF ``model.<module path>.weight`` is our ``<module path>.kernel``
(linear layers, transposed: HF stores ``[out, in]``, we store ``[in, out]``), ``.scale`` (RMSNorm)
or ``.embedding`` (embedding table, ``[vocab, hidden]`` in both); ``.bias`` is ``.bias``; HF
``lm_head.weight [vocab, hidden]`` is our ``lm_head.kernel [hidden, vocab]`` (absent when
tie_word_embeddings). The expected tensors, and their shapes, come from the model itself
(``nnx.eval_shape`` of the config's model, ``model.family.build``), so the converter cannot drift
from the model.

Memory: ``hf_to_flax`` reads one tensor at a time, in blocks of rows, and keeps only the converted
copy, which orbax then writes in place; its peak is one model copy in the target dtype plus about
128 MiB. ``flax_to_hf`` reads one output shard at a time (orbax partial restore); its peak is a
few shards. Figures: benchmarks/convert_memory.py. Outputs are written into a temporary directory
next to DST and renamed into place at the end (``fileio.atomic_dir``, which also removes what a
killed conversion left there).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

from distfair_jax import fileio
from distfair_jax.errors import InputError
from distfair_jax.model import family
from distfair_jax.model import checkpoint_io
from distfair_jax.model.llama import LlamaConfig
from distfair_jax.model.loader import load_pretrained
from distfair_jax.model.modeldir import (MODEL_CONFIG, PARAMS_DIR, load_model_config,
                                         config_from_hf as _config_from_hf,
                                         read_json as _read_json,
                                         write_model_config as _write_model_config)

__all__ = ["hf_to_flax", "flax_to_hf", "write_hf", "save_pretrained", "load_model_config", "check",
           "hf_name", "MODEL_CONFIG", "PARAMS_DIR"]

# Copied unchanged from source to destination, in both directions.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                    "chat_template.jinja", "chat_template.json", "generation_config.json")
_TOKENIZER_DIRS = ("additional_chat_templates",)
_DTYPES = {"bfloat16", "float32", "float16"}
_SOURCE_DTYPES = {"F64", "F32", "F16", "BF16"}
_PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
# Buffers some old checkpoints carry that are recomputed by the model.
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")

_LEAF_TO_HF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}

Path_ = tuple  # a parameter path in the NNX state: ("layers", 3, "self_attn", "q_proj", "kernel")


# ---------------------------------------------------------------------------------------------
# Names and expected shapes


def hf_name(path: Path_) -> tuple[str, bool]:
  """NNX parameter path -> (Hugging Face tensor name, whether the tensor is transposed).

  ("layers", 3, "self_attn", "q_proj", "kernel") -> ("model.layers.3.self_attn.q_proj.weight", True)
  """
  *modules, leaf = path
  if leaf not in _LEAF_TO_HF:
    raise ValueError(f"no Hugging Face name for parameter {path}")
  name = ".".join(str(m) for m in modules) + "." + _LEAF_TO_HF[leaf]
  if modules[:1] != ["lm_head"]:
    name = "model." + name
  return name, leaf == "kernel"


def _model_classes():
  return family.build, LlamaConfig


def _abstract_params(config) -> dict[Path_, Any]:
  """Flat {path: jax.ShapeDtypeStruct} of the model's parameters, built without allocating."""
  from flax import nnx
  build, _ = _model_classes()
  per_layer = config.replace(scan_layers=False)  # the names on disk (model/layout.py)
  model = nnx.eval_shape(lambda: build(per_layer, rngs=nnx.Rngs(0)))
  state = nnx.state(model, nnx.Param)
  return {tuple(k): v.get_value() if hasattr(v, "get_value") else v.value
          for k, v in nnx.to_flat_state(state)}


def _expected_hf(config) -> dict[str, tuple[Path_, bool, tuple[int, ...]]]:
  """{HF name: (our path, transposed, HF shape)} for every parameter of ``config``'s model."""
  out = {}
  for path, leaf in _abstract_params(config).items():
    name, transposed = hf_name(path)
    shape = tuple(leaf.shape)
    out[name] = (path, transposed, shape[::-1] if transposed else shape)
  return out


def _nest(flat: dict[Path_, Any]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = value
  return tree


# ---------------------------------------------------------------------------------------------
# Configs


def _with_dtype(config, dtype: str | None):
  return config if dtype is None else config.replace(dtype=dtype, param_dtype=dtype)


def _np_dtype(name: str) -> np.dtype:
  """"bfloat16" | "float32" | "float16" -> numpy dtype (bfloat16 from ml_dtypes, as jax uses)."""
  import ml_dtypes
  return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


# ---------------------------------------------------------------------------------------------
# Reading Hugging Face safetensors


@dataclasses.dataclass(frozen=True)
class _TensorInfo:
  file: Path
  shape: tuple[int, ...]
  dtype: str  # safetensors dtype string: F32, BF16, ...


def _refuse_pickle(src: Path) -> None:
  found = sorted({p.name for pattern in _PICKLE_PATTERNS for p in src.glob(pattern)})
  raise InputError(
      f"{src}: weights: expected *.safetensors files, got only pickled PyTorch weights "
      f"({', '.join(found[:3])}{', ...' if len(found) > 3 else ''}), which are never loaded "
      "(pickle can run code); convert them once with transformers in a trusted environment: "
      "AutoModelForCausalLM.from_pretrained(SRC).save_pretrained(OUT, safe_serialization=True)")


def _index_safetensors(src: Path) -> dict[str, _TensorInfo]:
  """{tensor name: info} over the single file or the shards named by the index (headers only)."""
  from safetensors import safe_open
  index_path = src / "model.safetensors.index.json"
  if index_path.is_file():
    index = _read_json(index_path, "a safetensors index with a weight_map")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
      raise InputError(f"{index_path}: weight_map: expected a non-empty object, got "
                       f"{type(weight_map).__name__}")
    files = sorted(set(weight_map.values()))
    for name in files:
      if not (src / name).is_file():
        raise InputError(f"{index_path}: weight_map: expected shard {name} to exist in {src}, "
                         "got no such file")
  else:
    weight_map = None
    files = sorted(p.name for p in src.glob("*.safetensors"))
    if not files:
      if any(p for pattern in _PICKLE_PATTERNS for p in src.glob(pattern)):
        _refuse_pickle(src)
      raise InputError(f"{src}: weights: expected model.safetensors or sharded *.safetensors with "
                       "model.safetensors.index.json, got none")
  infos: dict[str, _TensorInfo] = {}
  for file in files:
    path = src / file
    fileio.check_not_lfs_pointer(path)
    try:
      with safe_open(str(path), framework="numpy") as f:
        for name in f.keys():
          if weight_map is not None and weight_map.get(name) != file:
            continue  # the index says this tensor lives elsewhere (or nowhere): it is not read
          if name in infos:
            raise InputError(f"{path}: {name}: expected each tensor in one file, got it also in "
                             f"{infos[name].file.name}")
          sl = f.get_slice(name)
          infos[name] = _TensorInfo(path, tuple(sl.get_shape()), sl.get_dtype())
    except InputError:
      raise
    except Exception as e:  # safetensors raises SafetensorError / OSError on a corrupt header
      raise InputError(f"{path}: header: expected a safetensors file, got an unreadable one "
                       f"({type(e).__name__}: {e})") from None
  if weight_map is not None:
    for name, file in weight_map.items():
      if name not in infos:
        raise InputError(f"{src / file}: {name}: expected the tensor the index names, got none")
  return infos


def _plan(config, infos: dict[str, _TensorInfo], src: Path) -> dict[str, tuple[Path_, bool]]:
  """Validates the checkpoint against the model: {HF name: (our path, transposed)} to read."""
  expected = _expected_hf(config)
  embed = "model.embed_tokens.weight"
  if embed in infos and embed in expected:
    found, want = infos[embed].shape, expected[embed][2]
    if len(found) == 2 and found[0] != want[0]:
      raise InputError(f"{infos[embed].file}: {embed}: expected vocab_size {want[0]} (from "
                       f"config.json), got an embedding with {found[0]} rows; the vocab size "
                       "differs between config and embedding")
  missing = [n for n in expected if n not in infos]
  if missing:
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    raise InputError(f"{src}: {missing[0]}: expected tensor, got none (missing tensors: "
                     f"{', '.join(missing[:5])}{more})")
  tied = bool(getattr(config, "tie_word_embeddings", False))
  extra = [n for n in infos if n not in expected and not _IGNORED.search(n)
           and not (tied and n == "lm_head.weight")]
  if extra:
    more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
    raise InputError(f"{src}: {extra[0]}: expected only the tensors of a {config.architecture} "
                     f"model, got unexpected tensors: {', '.join(extra[:5])}{more}")
  for name, (_, _, shape) in expected.items():
    info = infos[name]
    if info.shape != shape:
      raise InputError(f"{info.file}: {name}: expected shape {list(shape)}, got {list(info.shape)}")
    if info.dtype not in _SOURCE_DTYPES:
      raise InputError(f"{info.file}: {name}: expected a floating dtype "
                       f"({', '.join(sorted(_SOURCE_DTYPES))}), got {info.dtype}")
  return {name: (path, transposed) for name, (path, transposed, _) in expected.items()}


# ---------------------------------------------------------------------------------------------
# Output directories


def _check_dst(dst: Path, overwrite: bool, src: Path | None = None) -> None:
  if src is not None and dst.resolve() == src.resolve():
    raise InputError(f"{dst}: output: expected a directory other than the source, got the source")
  fileio.check_new_dir(dst, overwrite)


def _copy_tokenizer_files(src, dst) -> list[str]:
  """Copies the tokenizer files (and generation_config.json) of ``src`` into ``dst`` unchanged;
  either may be a bucket URL."""
  src, dst = fileio.as_path(src), fileio.as_path(dst)
  copied = []
  for name in _TOKENIZER_FILES:
    if (src / name).is_file():
      fileio.check_not_lfs_pointer(src / name)  # a stub copied along would fail only when served
      fileio.copy_file(src / name, dst / name)
      copied.append(name)
  for name in _TOKENIZER_DIRS:
    if (src / name).is_dir():
      fileio.copy_tree(src / name, dst / name)
      copied.append(name)
  return copied


def _progress(iterable, total: int, desc: str, enabled: bool):
  """tqdm over ``iterable`` on stderr when ``enabled``; with ``iterable=None`` a manual bar."""
  if not enabled:
    return iterable
  from tqdm.auto import tqdm
  return tqdm(iterable, total=total, desc=desc, unit="tensor", file=sys.stderr)


def _check_dtype(dtype: str | None, field: str = "dtype") -> None:
  if dtype is not None and dtype not in _DTYPES:
    raise InputError(f"{field}: expected one of {', '.join(sorted(_DTYPES))}, got {dtype!r}")


# ---------------------------------------------------------------------------------------------
# Hugging Face -> flax


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
_CHUNK_BYTES = 64 * 2**20


def _read_converted(info: _TensorInfo, name: str, transposed: bool, dtype: np.dtype) -> np.ndarray:
  """One tensor of a safetensors file as a C-contiguous array of ``dtype``, transposed if asked
  (HF ``[out, in]`` -> ours ``[in, out]``).

  Read in blocks of rows of at most ~64 MiB, each through its own ``safe_open``: safetensors
  memory-maps the file and the mapped pages it touched count in the process's RSS until the file
  is closed, so reading a whole multi-GB tensor (or keeping a shard open) would add up to twice
  its size to the peak. Here the transient is two blocks, whatever the tensor's size.
  """
  import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy; safetensors' numpy API needs it)
  from safetensors import safe_open
  shape = info.shape
  out = np.empty(shape[::-1] if transposed else shape, dtype)
  rows = shape[0] if shape else 1
  row_bytes = max(1, math.prod(shape[1:]) * _ITEMSIZE[info.dtype])
  step = max(1, _CHUNK_BYTES // row_bytes)
  for r0 in range(0, rows, step):
    r1 = min(rows, r0 + step)
    with safe_open(str(info.file), framework="numpy") as f:
      block = f.get_slice(name)[r0:r1] if shape else f.get_tensor(name)
    if not shape:
      out[...] = block
    elif transposed:
      out[:, r0:r1] = block.T
    else:
      out[r0:r1] = block
    del block
  return out


def hf_to_flax(src: str | os.PathLike, dst: str | os.PathLike, dtype: str = "bfloat16", *,
               overwrite: bool = False, progress: bool = False) -> Path:
  """Converts a local Hugging Face directory (config.json, safetensors, tokenizer files) into a
  converted directory at ``dst`` (layout in the module docstring), parameters cast to ``dtype``.

  Streams one tensor at a time: peak memory is one model copy in ``dtype`` plus a tensor or two.
  Raises ``InputError`` (one line) for a bad source or an existing non-empty ``dst`` without
  ``overwrite``; nothing is left at ``dst`` unless the conversion completes. Returns ``dst``.
  """
  _check_dtype(dtype)
  src, dst = Path(src).absolute(), Path(dst).absolute()
  if not src.is_dir():
    raise InputError(f"{src}: source: expected a Hugging Face model directory, got "
                     f"{'a file' if src.exists() else 'no such directory'}")
  _check_dst(dst, overwrite, src)
  config_path = src / "config.json"
  hf = _read_json(config_path, "a Hugging Face config.json")
  config = _with_dtype(_config_from_hf(hf, config_path), dtype)
  for name in _TOKENIZER_FILES:  # a Git LFS stub is named now, not after the weights are read
    fileio.check_not_lfs_pointer(src / name)
  infos = _index_safetensors(src)
  plan = _plan(config, infos, src)
  target = _np_dtype(dtype)

  flat: dict[Path_, np.ndarray] = {}
  names = sorted(plan, key=lambda n: (str(infos[n].file), _hf_order(n)))
  for name in _progress(names, len(names), "converting", progress):
    path, transposed = plan[name]
    flat[path] = _read_converted(infos[name], name, transposed, target)

  with fileio.atomic_dir(dst, overwrite=overwrite) as tmp:
    tree = _nest(flat)
    del flat
    checkpoint_io.save_params(tmp / PARAMS_DIR, tree)
    del tree
    _write_model_config(tmp / MODEL_CONFIG, config)
    _copy_tokenizer_files(src, tmp)
  return dst


# ---------------------------------------------------------------------------------------------
# flax -> Hugging Face


def _parse_size(size: int | str) -> int:
  """"5GB" -> 5 * 10**9, "500MiB" -> 500 * 2**20, 1000 -> 1000 (bytes)."""
  if isinstance(size, int):
    n = size
  else:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(size), flags=re.IGNORECASE)
    if not m:
      raise InputError(f"max_shard_size: expected a size such as 5GB, 500MB or a number of bytes, "
                       f"got {size!r}")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10,
             "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    n = int(float(m.group(1)) * scale)
  if n <= 0:
    raise InputError(f"max_shard_size: expected a positive size, got {size!r}")
  return n


def _hf_order(name: str) -> tuple:
  """Embedding, layer by layer, final norm, lm_head: how HF checkpoints are laid out."""
  m = re.match(r"model\.layers\.(\d+)\.(.*)", name)
  if m:
    return (1, int(m.group(1)), m.group(2))
  return (0 if "embed_tokens" in name else 2, 0, name)


def _check_stored(src: Path, expected: dict) -> dict:
  """The stored parameters' metadata, checked against the model of model_config.json."""
  stored = checkpoint_io.params_metadata(src / PARAMS_DIR)
  by_path = {path: (name, transposed, shape)
             for name, (path, transposed, shape) in expected.items()}
  for path, (name, transposed, shape) in by_path.items():
    if path not in stored:
      raise InputError(f"{src / PARAMS_DIR}: {'.'.join(map(str, path))}: expected parameter "
                       f"(for {name}), got none")
    ours = shape[::-1] if transposed else shape
    if stored[path][0] != ours:
      raise InputError(f"{src / PARAMS_DIR}: {'.'.join(map(str, path))}: expected shape "
                       f"{list(ours)}, got {list(stored[path][0])}")
  extra = [p for p in stored if p not in by_path]
  if extra:
    raise InputError(f"{src / PARAMS_DIR}: {'.'.join(map(str, extra[0]))}: expected only the "
                     f"parameters of the model in {MODEL_CONFIG}, got unexpected ones "
                     f"({', '.join('.'.join(map(str, p)) for p in extra[:5])})")
  return {path: stored[path] for path in by_path}


def _plan_shards(names: list[str], expected: dict, dtype: np.dtype, limit: int) -> list[list[str]]:
  """Tensor names in safetensors shards of at most ``limit`` bytes (a larger tensor alone)."""
  shards: list[list[str]] = [[]]
  size = 0
  for name in names:
    nbytes = math.prod(expected[name][2]) * dtype.itemsize
    if shards[-1] and size + nbytes > limit:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += nbytes
  return shards


def write_hf(dst: str | os.PathLike, config, read, *, stored_dtype: Any,
             tokenizer_dir: str | os.PathLike | None = None, max_shard_size: int | str = "5GB",
             dtype: str | None = None, overwrite: bool = False, progress: bool = False) -> Path:
  """Writes a Hugging Face directory ``dst`` for ``config``'s model: config.json, safetensors
  (``model.safetensors``, or shards of at most ``max_shard_size`` plus
  ``model.safetensors.index.json``), and ``tokenizer_dir``'s tokenizer files and
  generation_config.json copied unchanged.

  read: ``read(paths) -> {path: numpy array}`` of our parameter paths, called once per output
  shard (so the caller decides how much is in memory). stored_dtype: the parameters' dtype, the
  output's unless ``dtype`` says otherwise.
  """
  from safetensors.numpy import save_file
  _check_dtype(dtype)
  shard_limit = _parse_size(max_shard_size)
  expected = _expected_hf(config)
  out_dtype = _np_dtype(dtype) if dtype else np.dtype(stored_dtype)
  names = sorted(expected, key=_hf_order)
  shards = _plan_shards(names, expected, out_dtype, shard_limit)
  total = sum(math.prod(expected[n][2]) * out_dtype.itemsize for n in names)
  with fileio.local_dir_for(dst, overwrite=overwrite) as local:  # a bucket URL works too
    tmp = Path(local)
    weight_map = {}
    bar = _progress(None, len(names), "writing", progress) if progress else None
    for i, shard in enumerate(shards):
      file = ("model.safetensors" if len(shards) == 1
              else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors")
      params = read([expected[n][0] for n in shard])
      tensors = {}
      for name in shard:
        path, transposed, _ = expected[name]
        x = params.pop(path)
        tensors[name] = np.ascontiguousarray(x.T if transposed else x, dtype=out_dtype)
        weight_map[name] = file
      save_file(tensors, str(tmp / file), metadata={"format": "pt"})
      os.chmod(tmp / file, 0o666 & ~_umask())  # what a plain file gets, not a private one
      del tensors
      if bar is not None:
        bar.update(len(shard))
    if bar is not None:
      bar.close()
    if len(shards) > 1:
      fileio.write_json(tmp / "model.safetensors.index.json",
                        {"metadata": {"total_size": total}, "weight_map": weight_map})
    hf = config.to_hf()
    hf["architectures"] = hf.get("architectures") or [config.architecture]
    hf["dtype"] = out_dtype.name
    hf["torch_dtype"] = out_dtype.name  # transformers < 5 and the vLLM versions built on it
    fileio.write_text(tmp / "config.json", json.dumps(hf, indent=2, sort_keys=True) + "\n")
    if tokenizer_dir is not None:
      _copy_tokenizer_files(tokenizer_dir, tmp)
  return fileio.as_path(dst)


def _umask() -> int:
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def flax_to_hf(src: str | os.PathLike, dst: str | os.PathLike, max_shard_size: int | str = "5GB",
               *, dtype: str | None = None, overwrite: bool = False,
               progress: bool = False) -> Path:
  """Writes a converted (or trained) directory ``src`` as a Hugging Face directory ``dst``
  (``write_hf``), reading one output shard's parameters at a time (orbax partial restore: peak
  memory is a few shards, not the model). ``transformers.AutoModelForCausalLM.from_pretrained(dst)``
  loads it (and vLLM serves it). dtype: output dtype (default: the stored one). Returns ``dst``.
  """
  src, dst = Path(src).absolute(), Path(dst).absolute()
  _check_dst(dst, overwrite, src)
  config = load_model_config(src)
  stored = _check_stored(src, _expected_hf(config))
  read = lambda paths: checkpoint_io.load_param_subset(src / PARAMS_DIR, paths)
  return write_hf(dst, config, read,
                  stored_dtype=next(iter(stored.values()))[1], tokenizer_dir=src,
                  max_shard_size=max_shard_size, dtype=dtype, overwrite=overwrite,
                  progress=progress)


# ---------------------------------------------------------------------------------------------
# Loading and saving converted directories


def save_pretrained(path: str | os.PathLike, model_or_state: Any, config: Any,
                    tokenizer: Any = None, *, overwrite: bool = False) -> Path:
  """Writes a converted directory (params, model_config.json, tokenizer) from a model or its
  parameter state; what training's final export uses so that ``flax_to_hf`` can read it.
  tokenizer: a transformers tokenizer (saved with ``save_pretrained``) or a directory whose
  tokenizer files are copied."""
  from flax import nnx
  path = Path(path).absolute()
  state = model_or_state
  if isinstance(model_or_state, nnx.Module):
    state = nnx.state(model_or_state, nnx.Param)
  with fileio.atomic_dir(path, overwrite=overwrite) as tmp:
    checkpoint_io.save_params(tmp / PARAMS_DIR, state)
    _write_model_config(tmp / MODEL_CONFIG, config)
    if isinstance(tokenizer, (str, os.PathLike)):
      _copy_tokenizer_files(tokenizer, tmp)
    elif tokenizer is not None:
      tokenizer.save_pretrained(str(tmp))
  return path


# ---------------------------------------------------------------------------------------------
# Parity check


def _check_sequences(vocab: int, num: int, length: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Random ``input_ids [num, length]`` and ``attention_mask``: row 0 unpadded, odd rows
  right-padded, other even rows left-padded (a quarter to a half of the length)."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, vocab, size=(num, length), dtype=np.int64)
  mask = np.ones((num, length), np.int64)
  for i in range(1, num):
    pad = int(rng.integers(length // 4, length // 2 + 1))
    if i % 2:
      mask[i, length - pad:] = 0
    else:
      mask[i, :pad] = 0
  ids = np.where(mask == 1, ids, 0)
  return ids, mask


def _log_softmax(x: np.ndarray) -> np.ndarray:
  x = x.astype(np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _forward_logits(model, input_ids, attention_mask):
  """input_ids, attention_mask: [B, L] -> logits [B, L, V] float32 (one jit compile)."""
  from flax import nnx

  @nnx.jit
  def forward(model, input_ids, attention_mask):
    return model.logits(model(input_ids, attention_mask))

  return forward(model, input_ids, attention_mask)


def check(hf_dir: str | os.PathLike, flax_dir: str | os.PathLike, *, num_sequences: int = 4,
          length: int = 32, seed: int = 0) -> dict[str, Any]:
  """Compares a converted directory with its Hugging Face source, both in float32.

  With torch installed: runs ``AutoModelForCausalLM`` and our model on ``num_sequences`` random
  token sequences (with left and right padding) and returns {"max_abs_logit_diff", "max_kl"}
  (KL(hf || ours) per real position, max over positions). Always: {"max_abs_weight_diff"} over all
  tensors (read one at a time). {"torch": False} when torch is missing (weights compared only).
  """
  import jax.numpy as jnp
  hf_dir, flax_dir = Path(hf_dir).absolute(), Path(flax_dir).absolute()
  hf_config_path = hf_dir / "config.json"
  hf_cfg = _read_json(hf_config_path, "a Hugging Face config.json")
  _config_from_hf(hf_cfg, hf_config_path)
  model, _, config = load_pretrained(flax_dir, dtype="float32")
  infos = _index_safetensors(hf_dir)
  expected = _expected_hf(config)
  from flax import nnx
  ours = {tuple(k): np.asarray(v.get_value() if hasattr(v, "get_value") else v.value)
          for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  result: dict[str, Any] = {"max_abs_weight_diff": 0.0}
  for name, (path, transposed, shape) in expected.items():
    if name not in infos:
      raise InputError(f"{hf_dir}: {name}: expected tensor, got none")
    if infos[name].shape != shape:
      raise InputError(f"{infos[name].file}: {name}: expected shape {list(shape)}, got "
                       f"{list(infos[name].shape)}")
    x = _read_converted(infos[name], name, False, np.dtype(np.float32))
    y = ours[path].T if transposed else ours[path]
    result["max_abs_weight_diff"] = max(result["max_abs_weight_diff"],
                                        float(np.max(np.abs(x - y))) if x.size else 0.0)
  try:
    import torch
  except ImportError:
    result["torch"] = False
    return result
  result["torch"] = True
  from transformers import AutoModelForCausalLM
  ids, mask = _check_sequences(config.vocab_size, num_sequences, length, seed)
  hf_model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
  hf_model.eval()
  positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
  with torch.no_grad():
    ref = hf_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                   position_ids=torch.from_numpy(positions)).logits.float().numpy()
  got = _forward_logits(model, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
  got = np.asarray(got, dtype=np.float32)
  real = mask.astype(bool)
  result["max_abs_logit_diff"] = float(np.max(np.abs(ref - got)[real]))
  lp, lq = _log_softmax(ref), _log_softmax(got)
  kl = (np.exp(lp) * (lp - lq)).sum(-1)
  result["max_kl"] = float(np.max(kl[real]))
  result["sequences"] = [num_sequences, length]
  return result
