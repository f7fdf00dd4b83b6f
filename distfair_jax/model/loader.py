"""The one model loader: a config section -> the model split the train step, sampler and exporter use.

    m = load_model(cfg.model, cfg.lora, mesh, seed=cfg.seed)          # training, evaluation, export
    m = load_model(cfg.model, cfg.lora, mesh, abstract=True)          # distfair plan: shapes only
    m.graphdef, m.graphdef_eval, m.params, m.rngs, m.frozen          # nnx.split of the model
    m.param_shardings, m.frozen_shardings, m.tokenizer, m.config      # placement, tokenizer, shape
    model = m.merged()                                                # nnx.Module, LoRA folded in

The model comes from ``model.checkpoint`` (a directory from ``distfair convert hf-to-flax``; relative
paths are resolved against the working directory) or from ``model.preset`` with random weights, or
the weights of ``model.params`` (an orbax params directory such as a run's final parameters). LoRA
adapters (``lora.enabled``) wrap the targeted projections; the split then trains the adapters
alone. Parameters are placed on ``mesh`` by the logical-axis rules of ``distfair_jax.sharding``
(each host reads only its own shards of a checkpoint).

Split: ``graphdef, params, rngs, frozen = nnx.split(model, trainable, nnx.RngState, ...)`` with
``trainable`` every ``nnx.Param`` (full fine-tuning) or the ``nnx.LoRAParam`` adapters;
``graphdef_eval`` is the same graph in eval mode (dropout off), for every forward without gradient.

The tokenizer: ``model.tokenizer``, else the checkpoint's files, else ``tokenizer_dir`` (e.g. a
run's saved copy), else the built-in tiny tokenizer (built offline, deterministically).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx

from distfair_jax import fileio
from distfair_jax import sharding as shd
from distfair_jax.config import LoraConfig, ModelConfig
from distfair_jax.errors import InputError
from distfair_jax.data.tokenizer import build_tiny_tokenizer, load_tokenizer_dir
from distfair_jax.model import checkpoint_io, family, presets
from distfair_jax.model import lora as lora_lib
from distfair_jax.model.llama import LlamaConfig
from distfair_jax.model.modeldir import MODEL_CONFIG, PARAMS_DIR, load_model_config

__all__ = ["LoadedModel", "load_model", "model_config", "load_tokenizer", "load_pretrained",
           "trainable_filter", "split_model", "PARAMS_DIR", "MODEL_CONFIG"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def trainable_filter(lora: bool):
  """The nnx filter of the trained variables: adapters under LoRA, every Param otherwise."""
  return nnx.LoRAParam if lora else nnx.Param


def split_model(model: nnx.Module, lora: bool):
  """-> (graphdef, graphdef_eval, params, rngs, frozen) of a model (see the module docstring)."""
  trainable = trainable_filter(lora)
  graphdef, params, rngs, frozen = nnx.split(model, trainable, nnx.RngState, ...)
  model.eval()  # dropout off: the graph of every forward that takes no gradient
  graphdef_eval = nnx.split(model, trainable, nnx.RngState, ...)[0]
  model.train()
  return graphdef, graphdef_eval, params, rngs, frozen


@dataclasses.dataclass
class LoadedModel:
  """A model split for pure-function use (see the module docstring). With ``abstract=True`` the
  state leaves are ``jax.ShapeDtypeStruct`` carrying their shardings and ``tokenizer`` is None."""
  config: LlamaConfig
  graphdef: Any
  graphdef_eval: Any
  params: nnx.State
  rngs: nnx.State
  frozen: nnx.State
  param_shardings: Any
  frozen_shardings: Any
  tokenizer: Any
  name: str
  source: str  # "checkpoint" | "preset"
  lora: bool
  tokenizer_dir: Any = None  # where the tokenizer files are (None: built in memory)

  @property
  def num_params(self) -> int:
    return int(sum(x.size for x in jax.tree.leaves((self.params, self.frozen))))

  @property
  def num_trainable(self) -> int:
    return int(sum(x.size for x in jax.tree.leaves(self.params)))

  def with_params(self, params: nnx.State) -> LoadedModel:
    return dataclasses.replace(self, params=params)

  def merged(self) -> nnx.Module:
    """The model in eval mode with ``params``, LoRA adapters folded into the base kernels."""
    model = nnx.merge(self.graphdef_eval, self.params, self.rngs, self.frozen, copy=True)
    if self.lora:
      model = lora_lib.merge_lora(model)
    model.eval()
    return model


def _checkpoint(model_cfg: ModelConfig) -> fileio.Path | None:
  return fileio.as_path(model_cfg.checkpoint) if model_cfg.checkpoint else None


def model_config(model_cfg: ModelConfig, *, allow_missing: bool = False
                 ) -> tuple[LlamaConfig, str, str]:
  """-> (LlamaConfig with the section's dtypes and remat, name, "checkpoint" | "preset"): from
  ``model.checkpoint``'s
  model_config.json, else ``model.preset`` with ``model.overrides``. ``allow_missing``: a
  checkpoint directory that does not exist yet falls back to the preset (for planning)."""
  ckpt = _checkpoint(model_cfg)
  if ckpt is not None and not (allow_missing and not (ckpt / MODEL_CONFIG).exists()):
    if model_cfg.overrides:
      raise InputError(f"model.overrides: expected none with model.checkpoint (the checkpoint "
                       f"fixes the shapes), got {dict(model_cfg.overrides)}")
    mcfg, name, source = load_model_config(ckpt), str(ckpt), "checkpoint"
  else:
    mcfg = presets.get_preset(model_cfg.preset, **dict(model_cfg.overrides))
    name, source = model_cfg.preset, "preset"
  return mcfg.replace(dtype=str(model_cfg.dtype), param_dtype=str(model_cfg.param_dtype),
                      remat=str(model_cfg.remat), scan_layers=bool(model_cfg.scan_layers)
                      ), name, source


def _auto_tokenizer(path: fileio.Path):
  if not path.is_dir():
    raise InputError(f"{path}: tokenizer: expected a Hugging Face tokenizer directory, got "
                     f"{'a file' if path.exists() else 'no such directory'}")
  with fileio.local_copy(path) as local:  # transformers reads local files only
    return load_tokenizer_dir(local)


def _tokenizer_dir(model_cfg: ModelConfig, tokenizer_dir: Any, required: bool):
  """Where the tokenizer of a model section comes from (None: the built-in tiny one)."""
  if model_cfg.tokenizer:
    return fileio.as_path(model_cfg.tokenizer)
  has_files = lambda p: any((p / f).exists() for f in _TOKENIZER_FILES)
  ckpt = _checkpoint(model_cfg)
  if ckpt is not None:
    if not has_files(ckpt):
      if not required:
        return None
      raise InputError(f"{ckpt}: tokenizer: expected the checkpoint's tokenizer files "
                       f"({', '.join(_TOKENIZER_FILES)}) or model.tokenizer, got neither")
    return ckpt
  if tokenizer_dir is not None and has_files(fileio.as_path(tokenizer_dir)):
    return fileio.as_path(tokenizer_dir)
  return None


def load_tokenizer(model_cfg: ModelConfig, tokenizer_dir: Any = None, *, required: bool = True):
  """The tokenizer of a model section: ``model.tokenizer``, else the checkpoint's files, else
  ``tokenizer_dir``'s (e.g. a run's saved copy), else the built-in tiny tokenizer. A checkpoint
  without tokenizer files is an error, or gives None when not ``required``."""
  path = _tokenizer_dir(model_cfg, tokenizer_dir, required)
  if path is not None:
    return _auto_tokenizer(path)
  if model_cfg.checkpoint:
    return None
  return build_tiny_tokenizer()


def _build(mcfg: LlamaConfig, lora_cfg: LoraConfig, mesh, seed: int, params_dir, abstract: bool):
  """The (abstract or placed) model with LoRA applied."""
  def factory():
    model = family.build(mcfg, rngs=nnx.Rngs(seed))
    if abstract and lora_cfg.enabled:
      _apply_lora(model, lora_cfg, seed)
    return model

  if abstract:
    return nnx.eval_shape(factory)
  if params_dir is not None:
    gdef, abs_params, rest = nnx.split(nnx.eval_shape(factory), nnx.Param, ...)
    shardings = shd.state_shardings(abs_params, mesh)
    pure = checkpoint_io.load_params(params_dir, nnx.to_pure_dict(abs_params),
                                     sharding=nnx.to_pure_dict(shardings))
    nnx.replace_by_pure_dict(abs_params, pure)
    model = nnx.merge(gdef, abs_params, rest)
  else:
    model = shd.create_sharded(factory, mesh)
  if lora_cfg.enabled:
    _apply_lora(model, lora_cfg, seed)
    nnx.update(model, shd.shard_state(nnx.state(model), mesh))
  return model


def _apply_lora(model, lora_cfg: LoraConfig, seed: int) -> None:
  try:
    lora_lib.apply_lora(model, lora_cfg.targets, rank=lora_cfg.rank, alpha=lora_cfg.alpha,
                        dropout=lora_cfg.dropout, seed=seed)
  except ValueError as e:
    raise InputError(f"lora: targets: {e}") from None


def _check_sharded(model, mesh) -> None:
  frac = shd.replicated_fraction(nnx.state(model, nnx.Param))
  sizes = dict(mesh.shape)
  if (sizes.get("fsdp", 1) > 1 or sizes.get("tensor", 1) > 1) and frac > 0.1:
    raise InputError(f"mesh: fsdp, tensor: expected the sharding rules to split this model on "
                     f"fsdp={sizes.get('fsdp')} tensor={sizes.get('tensor')}, got {frac:.0%} of "
                     f"the parameters replicated (its shapes do not divide)")


def load_model(model_cfg: ModelConfig, lora_cfg: LoraConfig, mesh, *, seed: int = 0,
               abstract: bool = False, params: Any = None, tokenizer: Any = None,
               tokenizer_dir: Any = None, require_tokenizer: bool = True) -> LoadedModel:
  """Builds the model of ``model_cfg`` / ``lora_cfg`` on ``mesh`` (see the module docstring).

  Args:
    seed: initialises random presets and the LoRA adapters.
    abstract: shapes (and, with a mesh, shardings) only: nothing allocated, no tokenizer; a
      checkpoint that does not exist yet is sized from the preset. ``mesh`` may then be None.
    params: an orbax params directory of the base model's weights (default: ``model.params``,
      else the checkpoint's).
    tokenizer: a tokenizer to use as it is; else ``load_tokenizer(model_cfg, tokenizer_dir)``
      (``require_tokenizer=False``: None for a checkpoint without tokenizer files).
  """
  mcfg, name, source = model_config(model_cfg, allow_missing=abstract)
  ckpt = _checkpoint(model_cfg)
  if params is None and model_cfg.params:
    params = fileio.as_path(model_cfg.params)
  elif params is None and ckpt is not None and not abstract:
    params = ckpt / PARAMS_DIR
  if not abstract and tokenizer is None:
    tokenizer = load_tokenizer(model_cfg, tokenizer_dir, required=require_tokenizer)
  if not abstract and tokenizer is not None:
    if len(tokenizer) > mcfg.vocab_size:
      raise InputError(f"{model_cfg.tokenizer or name}: vocab: the tokenizer has {len(tokenizer)} "
                       f"tokens but the model's vocab_size is {mcfg.vocab_size}")
  model = _build(mcfg, lora_cfg, mesh, seed, params, abstract)
  if not abstract:
    _check_sharded(model, mesh)
  graphdef, graphdef_eval, p, rngs, frozen = split_model(model, lora_cfg.enabled)
  p_sh = f_sh = None
  if mesh is not None:
    p_sh, f_sh = shd.state_shardings(p, mesh), shd.state_shardings(frozen, mesh)
  if abstract and mesh is not None:
    sds = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
    p, frozen = jax.tree.map(sds, p, p_sh), jax.tree.map(sds, frozen, f_sh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    rngs = jax.tree.map(lambda a: sds(a, replicated), rngs)
  tok_dir = None if abstract else _tokenizer_dir(model_cfg, tokenizer_dir, require_tokenizer)
  return LoadedModel(mcfg, graphdef, graphdef_eval, p, rngs, frozen, p_sh, f_sh,
                     None if abstract else tokenizer, name, source, lora_cfg.enabled, tok_dir)


def load_pretrained(path: Any, dtype: str | None = None, *, mesh=None, scan_layers: bool = False):
  """(model, tokenizer or None, LlamaConfig) of a converted directory, the model in eval mode;
  ``dtype`` overrides the stored compute / parameter dtype; ``mesh`` places it (default: one
  device); ``scan_layers`` stacks its layers (``LlamaConfig.scan_layers``)."""
  mesh = mesh if mesh is not None else shd.make_mesh({"data": 1}, jax.devices()[:1])
  stored = load_model_config(fileio.as_path(path))
  dt = dtype or stored.param_dtype
  m = load_model(ModelConfig(checkpoint=str(path), dtype=dtype or stored.dtype, param_dtype=dt,
                             remat=stored.remat, scan_layers=scan_layers), LoraConfig(), mesh,
                 require_tokenizer=False)
  return m.merged(), m.tokenizer, m.config
