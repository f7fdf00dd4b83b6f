"""The two layouts of the decoder layers' parameters, and the conversion between them.

- per layer (``LlamaConfig.scan_layers=False``, and every params directory on disk): one subtree
  per layer, ``{"layers": {0: {...}, 1: {...}, ...}}``, leaves ``[...]``;
- stacked (``scan_layers=True``, the model scans over its layers): one subtree,
  ``{"layers": {...}}``, every leaf ``[num_layers, ...]`` with a leading ``layers`` axis.

A params directory is always written per layer (``checkpoint_io.save_params`` unstacks), so a
converted model, a run's final parameters and an export read the same whichever layout trained
them, and ``checkpoint_io.load_params`` stacks on the way in when the target is stacked.

The functions take pure nested dicts (``nnx.to_pure_dict``) whose leaves are arrays (numpy or
jax; sharded jax arrays are restacked inside ``jax.jit`` with the target shardings),
``jax.ShapeDtypeStruct``s (their ``NamedSharding`` follows: the ``layers`` axis is never split)
or ``NamedSharding``s.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

__all__ = ["is_stacked", "num_layers", "stack_layers", "unstack_layers", "restack"]

LAYERS = "layers"


def _layers(tree: Any):
  return tree.get(LAYERS) if isinstance(tree, dict) else None


def is_stacked(tree: Any) -> bool:
  """Whether ``tree`` holds the layers stacked (a ``layers`` subtree not keyed by layer index)."""
  layers = _layers(tree)
  return isinstance(layers, dict) and bool(layers) and not all(isinstance(k, int) for k in layers)


def num_layers(tree: Any) -> int:
  """How many layers ``tree`` holds, in either layout (0 without a ``layers`` subtree)."""
  layers = _layers(tree)
  if not layers:
    return 0
  if not is_stacked(tree):
    return len(layers)
  return int(_shape(jax.tree.leaves(layers, is_leaf=_is_sharding)[0])[0])


def _is_sharding(x) -> bool:
  return isinstance(x, jax.sharding.Sharding)


def _shape(x) -> tuple[int, ...]:
  return tuple(x.shape)


def _slice(x, i: int):
  """Layer ``i`` of a stacked leaf."""
  if isinstance(x, NamedSharding):
    return NamedSharding(x.mesh, P(*tuple(x.spec)[1:]))
  if _is_sharding(x):  # one device, or fully replicated: the same for a slice
    return x
  if isinstance(x, jax.ShapeDtypeStruct):
    sharding = None if x.sharding is None else _slice(x.sharding, i)
    return jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=sharding)
  return x[i]


def _stack(xs: list):
  """The stacked leaf of per-layer leaves ``xs``."""
  x = xs[0]
  if isinstance(x, NamedSharding):
    return NamedSharding(x.mesh, P(None, *tuple(x.spec)))
  if _is_sharding(x):
    return x
  if isinstance(x, jax.ShapeDtypeStruct):
    sharding = None if x.sharding is None else _stack([x.sharding])
    return jax.ShapeDtypeStruct((len(xs), *x.shape), x.dtype, sharding=sharding)
  if isinstance(x, np.ndarray):
    return np.stack(xs)
  return jnp.stack(xs)


def unstack_layers(tree: dict) -> dict:
  """Stacked -> per layer (a per-layer tree is returned as it is)."""
  if not is_stacked(tree):
    return tree
  n = num_layers(tree)
  layers = tree[LAYERS]
  per_layer = {i: jax.tree.map(lambda x: _slice(x, i), layers, is_leaf=_is_sharding)
               for i in range(n)}
  return {**tree, LAYERS: per_layer}


def stack_layers(tree: dict) -> dict:
  """Per layer -> stacked (a stacked tree, or one without layers, is returned as it is)."""
  layers = _layers(tree)
  if not layers or is_stacked(tree):
    return tree
  ordered = [layers[i] for i in sorted(layers)]
  if sorted(layers) != list(range(len(layers))):
    raise ValueError(f"layers: expected indices 0..{len(layers) - 1}, got {sorted(layers)}")
  stacked = jax.tree.map(lambda *xs: _stack(list(xs)), *ordered, is_leaf=_is_sharding)
  return {**tree, LAYERS: stacked}


def restack(tree: dict, *, stacked: bool, shardings: Any = None) -> dict:
  """``tree`` in the requested layout. Device arrays are converted inside ``jax.jit`` (arrays
  sharded over several processes cannot be sliced eagerly), placed on ``shardings`` (a tree of
  the result's structure; default: the layout's own shardings of the input's)."""
  if is_stacked(tree) == stacked or not _layers(tree):
    return tree
  convert = stack_layers if stacked else unstack_layers
  leaves = jax.tree.leaves(tree)
  if not leaves or not isinstance(leaves[0], jax.Array):
    return convert(tree)
  if shardings is None:
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            tree)
    shardings = jax.tree.map(lambda x: x.sharding, convert(abstract))
  return jax.jit(convert, out_shardings=shardings)(tree)
