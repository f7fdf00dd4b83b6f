"""The model directory: what a converted model (and a run's final parameters) is on disk.

  DIR/params/              orbax checkpoint of the NNX parameter tree (``model.checkpoint_io``)
  DIR/model_config.json    the model config: Hugging Face config fields (``LlamaConfig.to_hf()``)
                           plus a "distfair" entry with dtype / param_dtype / remat
  DIR/tokenizer*.json ...  the source's tokenizer files and generation_config.json

``convert`` (Hugging Face, GGUF) writes it; ``model.loader`` reads it. It lives in ``model/`` so that
the loader reads model directories without importing the converters (which import the model).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from distfair_jax import fileio
from distfair_jax.errors import InputError
from distfair_jax.model.llama import LlamaConfig

__all__ = ["MODEL_CONFIG", "PARAMS_DIR", "load_model_config", "write_model_config", "read_json",
           "config_from_hf", "dtype_name"]

MODEL_CONFIG = "model_config.json"
PARAMS_DIR = "params"


def read_json(path: Path, what: str) -> dict:
  if not path.is_file():
    raise InputError(f"{path}: file: expected {what}, got no such file")
  fileio.check_not_lfs_pointer(path)
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise InputError(f"{path}: json: expected {what}, got invalid JSON ({e})") from None
  if not isinstance(data, dict):
    raise InputError(f"{path}: json: expected an object, got {type(data).__name__}")
  return data


def config_from_hf(hf: dict, where: Path, **dtypes: str):
  """HF config dict -> LlamaConfig; InputError naming ``where`` (unsupported architecture, missing
  field, ...). ``dtypes``: dtype / param_dtype / remat for the config."""
  try:
    return LlamaConfig.from_hf(hf, **dtypes)
  except InputError as e:
    raise InputError(str(e).replace("config dict:", f"{where}:", 1)) from None
  except (KeyError, TypeError, ValueError) as e:
    raise InputError(f"{where}: config: expected a complete Llama/Qwen2/Gemma2/Qwen3/Gemma3 config, got "
                     f"{type(e).__name__}: {e}") from None


def dtype_name(d: Any) -> str:
  return np.dtype(d).name if not isinstance(d, str) else d


def write_model_config(path: Path, config) -> None:
  hf = config.to_hf()
  hf["distfair"] = {
      "format_version": 1,
      "dtype": dtype_name(getattr(config, "dtype", "float32")),
      "param_dtype": dtype_name(getattr(config, "param_dtype", "float32")),
      "remat": getattr(config, "remat", "none"),
  }
  fileio.write_text(path, json.dumps(hf, indent=2, sort_keys=True) + "\n")


def load_model_config(path: str | os.PathLike):
  """``LlamaConfig`` of a converted directory (reads ``path/model_config.json``)."""
  where = Path(path) / MODEL_CONFIG
  data = read_json(where, "a distfair model_config.json (a directory from `distfair convert "
                           "hf-to-flax`)")
  extra = data.pop("distfair", {}) or {}
  if not isinstance(extra, dict):
    raise InputError(f"{where}: distfair: expected an object, got {type(extra).__name__}")
  return config_from_hf(data, where, **{k: extra[k] for k in ("dtype", "param_dtype", "remat")
                                         if k in extra})
