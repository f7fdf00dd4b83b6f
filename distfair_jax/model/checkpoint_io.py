"""Orbax read/write of one parameter pytree (the params of a converted or trained model).

The tree is the NNX parameter state as a pure nested dict (``nnx.to_pure_dict(nnx.state(model,
nnx.Param))``): string keys for module attributes, int keys for layer indices, array leaves.
``hf_to_flax`` writes it with numpy leaves; training writes it with (possibly sharded) jax arrays;
both read back through :func:`load_params` with an abstract target, so orbax restores every leaf
with the target's dtype and, when given, its sharding (each host then reads only its own shards).

On disk the decoder layers are always per layer (``layers.<i>.*``): a tree from a model with
``scan_layers`` (leaves stacked on a leading ``layers`` axis) is unstacked when saved and a
stacked target is restacked when loaded (``distfair_jax.model.layout``), so every params
directory reads the same whichever layout wrote it.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy  # noqa: F401  (jax.numpy.dtype understands 'bfloat16')
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from distfair_jax import fileio
from distfair_jax.errors import InputError
from distfair_jax.model import layout

__all__ = ["save_params", "load_params", "load_param_subset", "params_metadata", "to_pure_params"]

PyTree = Any


def to_pure_params(params: PyTree) -> PyTree:
  """An ``nnx.State`` (or a pure dict already) -> pure nested dict of arrays."""
  if isinstance(params, nnx.State):
    return nnx.to_pure_dict(params)
  return params


def save_params(path: str | os.PathLike, params: PyTree, *, overwrite: bool = False):
  """Writes ``params`` (``nnx.State`` or pure dict of numpy/jax arrays) as an orbax checkpoint at
  ``path``. Synchronous: returns once every array is on disk. Orbax writes into a temporary
  directory and renames it into place, so a killed save leaves no half checkpoint at ``path``."""
  path = fileio.as_path(path)
  if path.exists():
    if not overwrite:
      raise InputError(f"{path}: output: expected a path that does not exist, got an existing one "
                       "(pass overwrite=True to replace it)")
    path.rmtree()
  tree = layout.restack(to_pure_params(params), stacked=False)
  # Peak memory: the default settings would hold a second copy of the model while saving, from
  # two sources: orbax's numpy handler deep-copies every host array first (so that an async save
  # may outlive the caller's arrays; this save is synchronous), and zstd compression of the
  # chunks buffers the compressed checkpoint until the OCDBT commit (weights barely compress).
  # The result is a standard orbax PyTree checkpoint that StandardRestore / PyTreeRestore read.
  th = ocp.type_handlers
  registry = th.create_type_handler_registry(
      (np.ndarray, th.NumpyHandler(deepcopy_host_arrays=False)),
      *((t, th.get_type_handler(t)) for t in (jax.Array, int, float, np.number, str)),
  )
  handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=False)
  with ocp.Checkpointer(handler) as ckptr:
    ckptr.save(path, args=ocp.args.PyTreeSave(tree))
  return path


def params_metadata(path: str | os.PathLike) -> dict[tuple, tuple[tuple[int, ...], np.dtype]]:
  """Flat ``{path tuple: (shape, dtype)}`` of a params checkpoint, read without loading arrays.
  Layer indices in the paths are ints, as in the NNX state."""
  path = fileio.as_path(path)
  if not path.is_dir():
    raise InputError(f"{path}: params: expected an orbax checkpoint directory, got nothing there")
  with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
    try:
      meta = ckptr.metadata(path)
    except Exception as e:  # orbax raises assorted errors for a non-checkpoint directory
      raise InputError(f"{path}: params: expected an orbax checkpoint, got an unreadable one "
                       f"({type(e).__name__}: {e})") from None
  tree = meta.item_metadata if hasattr(meta, "item_metadata") else meta
  tree = nnx.restore_int_paths(dict(tree))
  flat = {}
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    key = tuple(_key_entry(k) for k in key_path)
    flat[key] = (tuple(leaf.shape), np.dtype(leaf.dtype))
  return flat


def _key_entry(k) -> Any:
  if isinstance(k, jax.tree_util.DictKey):
    return k.key
  if isinstance(k, jax.tree_util.SequenceKey):
    return k.idx
  if isinstance(k, jax.tree_util.GetAttrKey):
    return k.name
  return k


def load_params(path: str | os.PathLike, target: PyTree | None = None, *, dtype: Any = None,
                sharding: jax.sharding.Sharding | PyTree | None = None) -> PyTree:
  """Restores the params checkpoint at ``path``.

  target: ``nnx.State`` or pure dict whose leaves are arrays or ``jax.ShapeDtypeStruct`` (e.g. from
    ``nnx.state(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))), nnx.Param)``); None restores
    the stored tree as host numpy arrays (no device memory; what ``flax_to_hf`` uses).
  dtype: cast every leaf to this dtype while reading (default: the target's / stored dtypes).
  sharding: (with a target) one ``jax.sharding.Sharding`` for every leaf, a pytree of them matching
    ``target``, or None to keep the target leaves' own shardings (jax arrays / ShapeDtypeStructs
    carrying one) and otherwise place leaves on the default device.
  Returns a pure nested dict (int keys for layer indices) of jax arrays, or numpy arrays when
  ``target`` is None.
  """
  path = fileio.as_path(path)
  if target is None:
    out: dict = {}
    for key, value in load_param_subset(path, list(params_metadata(path)), dtype=dtype).items():
      node = out
      for k in key[:-1]:
        node = node.setdefault(k, {})
      node[key[-1]] = value
    return out
  if not path.is_dir():
    raise InputError(f"{path}: params: expected an orbax checkpoint directory, got nothing there")
  tree = to_pure_params(target)
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  if sharding is None or isinstance(sharding, jax.sharding.Sharding):
    shardings = [sharding] * len(leaves)
  else:
    shardings = treedef.flatten_up_to(to_pure_params(sharding))
  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = []
  for leaf, s in zip(leaves, shardings):
    s = s or getattr(leaf, "sharding", None) or default
    abstract.append(jax.ShapeDtypeStruct(leaf.shape, jax.numpy.dtype(dtype or leaf.dtype),
                                         sharding=s))
  abstract_tree = jax.tree_util.tree_unflatten(treedef, abstract)
  stacked = layout.is_stacked(abstract_tree)
  with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
    try:
      out = ckptr.restore(path, args=ocp.args.StandardRestore(
          layout.unstack_layers(abstract_tree)))
    except (ValueError, KeyError) as e:
      raise InputError(f"{path}: params: expected a checkpoint matching the model's parameter "
                       f"tree, got a mismatch ({' '.join(str(e).split())[:300]})") from None
  if not stacked:
    return out
  return layout.restack(nnx.restore_int_paths(out), stacked=True,
                        shardings=jax.tree.map(lambda a: a.sharding, abstract_tree))


def load_param_subset(path: str | os.PathLike, keys: list[tuple], *,
                      dtype: Any = None) -> dict[tuple, np.ndarray]:
  """Host numpy arrays of only the parameters at ``keys`` (flat paths as in
  :func:`params_metadata`), read by an orbax partial restore: the rest is never loaded. Lets a
  caller stream a large checkpoint piece by piece (``flax_to_hf`` reads one output shard at a time).
  """
  path = fileio.as_path(path)
  meta = params_metadata(path)
  tree: dict = {}
  for key in keys:
    if key not in meta:
      raise InputError(f"{path}: {'.'.join(map(str, key))}: expected a stored parameter, got none")
    shape, stored = meta[key]
    node = tree
    for k in key[:-1]:
      node = node.setdefault(k, {})
    node[key[-1]] = jax.ShapeDtypeStruct(shape, jax.numpy.dtype(dtype or stored))
  restore_args = jax.tree_util.tree_map(
      lambda s: ocp.RestoreArgs(restore_type=np.ndarray, dtype=s.dtype), tree)
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
    out = ckptr.restore(path, args=ocp.args.PyTreeRestore(item=tree, restore_args=restore_args,
                                                          partial_restore=True))
  flat = {}
  for key in keys:
    node = out
    for k in key:
      node = node[k]
    flat[key] = node
  return flat
