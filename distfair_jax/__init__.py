"""distfair_jax: distribution-aligned fine-tuning of LLMs in JAX/Flax (arXiv 2604.05756).

Public entry points (imported lazily, so ``import distfair_jax`` stays cheap):

    from distfair_jax import losses                 # pure loss functions: steering_kl, kto_loss, ...
    from distfair_jax import load_pretrained        # (model, tokenizer, config) of a converted directory
    from distfair_jax import load_model             # the model split of a config (train, eval, plan)
    from distfair_jax import Llama, LlamaConfig     # the Flax NNX model (Gemma2: the same config)
    from distfair_jax import load_config, train     # configs and the training recipe
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "losses": ("distfair_jax.losses", None),
    "Llama": ("distfair_jax.model.llama", "Llama"),
    "LlamaConfig": ("distfair_jax.model.llama_config", "LlamaConfig"),
    "Gemma2": ("distfair_jax.model.gemma2", "Gemma2"),
    "get_preset": ("distfair_jax.model.presets", "get_preset"),
    "load_pretrained": ("distfair_jax.model.loader", "load_pretrained"),
    "load_model": ("distfair_jax.model.loader", "load_model"),
    "hf_to_flax": ("distfair_jax.convert.hf", "hf_to_flax"),
    "flax_to_hf": ("distfair_jax.convert.hf", "flax_to_hf"),
    "load_config": ("distfair_jax.config", "load_config"),
    "Config": ("distfair_jax.config", "Config"),
    "train": ("distfair_jax.train.trainer", "train"),
    "InputError": ("distfair_jax.errors", "InputError"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
  if name not in _LAZY:
    raise AttributeError(f"module 'distfair_jax' has no attribute {name!r}")
  module, attr = _LAZY[name]
  mod = importlib.import_module(module)
  return mod if attr is None else getattr(mod, attr)
