"""Device mesh (data, fsdp, tensor), the logical-axis rules table, and param / batch shardings.

Parameters and activations are annotated with *logical* axis names (``embed``, ``heads``, ...).
``LOGICAL_RULES`` is the one table mapping them to mesh axes. Resolution (``logical_to_spec``) drops a
mesh axis that is absent from the mesh, has size 1, was already used by an earlier dimension of the
same array, or does not divide the dimension; so the same annotations serve 1 device, 8 simulated CPU
devices, a GPU node or a TPU pod slice, and an odd shape (e.g. 2 kv heads on 4-way tensor
parallelism) falls back to replication on that dimension instead of failing.

The table uses Flax's LogicalRules format, so ``nnx.logical_axis_rules(LOGICAL_RULES)`` also works.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from distfair_jax.errors import InputError

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (str), axes (tuple) or None (replicated).
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # activations / batches
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("cache_length", None),
    # parameters (and the matching activation dimensions)
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("layers", None),  # the stacked axis of scanned layers: every device holds every layer's slice
)

Rules = Sequence[tuple[str, Any]]


# ------------------------------------------------------------------------------------------------
# Mesh
# ------------------------------------------------------------------------------------------------


def mesh_shape(axes: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Resolves -1 in ``{"data": -1, "fsdp": 1, "tensor": 1}`` -> sizes whose product is num_devices."""
  if not isinstance(axes, Mapping):
    raise InputError(f"mesh: axes: expected a mapping like {{'data': -1, 'fsdp': 1, 'tensor': 1}}, "
                     f"got {axes!r}")
  for name in axes:
    if name not in MESH_AXES:
      raise InputError(f"mesh: {name}: expected one of {', '.join(MESH_AXES)}, got an unknown axis")
  sizes = {name: axes.get(name, 1) for name in MESH_AXES}
  for name, size in sizes.items():
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or (size < 1 and size != -1):
      raise InputError(f"mesh: {name}: expected a positive integer or -1, got {size!r}")
  fill = [n for n, s in sizes.items() if s == -1]
  if len(fill) > 1:
    raise InputError(f"mesh: {', '.join(fill)}: expected at most one axis of size -1, got {len(fill)}")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if fill:
    if num_devices % fixed:
      raise InputError(f"mesh: {fill[0]}: expected the other axes' product ({fixed}) to divide the "
                       f"number of devices ({num_devices}), got {dict(axes)}")
    sizes[fill[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise InputError(f"mesh: data*fsdp*tensor: expected a product equal to the number of devices "
                     f"({num_devices}), got {fixed} from {dict(axes)}")
  return {n: int(s) for n, s in sizes.items()}


def make_mesh(axes: Mapping[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with axes (data, fsdp, tensor) from e.g. ``{"data": -1, "fsdp": 1, "tensor": 1}``.

  -1 fills the remaining devices; missing axes have size 1; all axes are Auto (GSPMD).
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape({"data": -1} if axes is None else axes, len(devices))
  return jax.make_mesh(tuple(sizes[n] for n in MESH_AXES), MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES), devices=devices)


# ------------------------------------------------------------------------------------------------
# Logical names -> PartitionSpec
# ------------------------------------------------------------------------------------------------


def _axis_sizes(mesh: Mesh | Mapping[str, int] | Any) -> dict[str, int]:
  if isinstance(mesh, Mapping):
    return dict(mesh)
  return dict(mesh.shape)


def logical_to_spec(logical_axes: Sequence[str | None] | None, shape: Sequence[int] | None,
                    mesh: Mesh | Mapping[str, int], rules: Rules = LOGICAL_RULES) -> P:
  """Resolves logical axis names to a PartitionSpec on ``mesh`` (a Mesh or {axis: size}).

  A mesh axis is dropped when absent or of size 1, already used by an earlier dimension, or when
  it would not divide the dimension (``shape`` None skips the divisibility check).
  """
  if not logical_axes:
    return P()
  table = dict(rules)
  sizes = _axis_sizes(mesh)
  used: set[str] = set()
  out: list[Any] = []
  for i, name in enumerate(logical_axes):
    target = table.get(name) if name is not None else None
    if target is None:
      out.append(None)
      continue
    cands = (target,) if isinstance(target, str) else tuple(target)
    chosen: list[str] = []
    for ax in cands:
      size = sizes.get(ax, 1)
      if size <= 1 or ax in used:
        continue
      if shape is not None and shape[i] % (math.prod(sizes[a] for a in chosen) * size):
        continue
      chosen.append(ax)
    used.update(chosen)
    out.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
  while out and out[-1] is None:
    out.pop()
  return P(*out)


def _current_rules(rules: Rules | None) -> Rules:
  if rules is not None:
    return rules
  from flax.core import spmd as core_spmd  # Flax's context rules, if a caller set them
  return core_spmd.get_logical_axis_rules() or LOGICAL_RULES


def constrain(x: jax.Array, logical_axes: Sequence[str | None], rules: Rules | None = None):
  """``with_sharding_constraint`` by logical names under ``jax.set_mesh``; a no-op without a mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or not all(
      t == jax.sharding.AxisType.Auto for t in mesh.axis_types):
    return x
  spec = logical_to_spec(logical_axes, x.shape, dict(mesh.shape), _current_rules(rules))
  return jax.lax.with_sharding_constraint(x, spec)


# ------------------------------------------------------------------------------------------------
# Parameter shardings
# ------------------------------------------------------------------------------------------------


def _is_var(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def variable_logical_axes(var: nnx.Variable) -> tuple | None:
  """The logical axis names stored in a Variable's ``out_sharding`` metadata (or None)."""
  meta = var.get_metadata()
  return meta.get("out_sharding") or None


def state_specs(state: Any, mesh: Mesh | Mapping[str, int], rules: Rules = LOGICAL_RULES) -> Any:
  """nnx.State (concrete or abstract) -> same tree with a PartitionSpec inside each Variable."""
  def spec(v):
    if _is_var(v):
      return v.replace(logical_to_spec(variable_logical_axes(v), v.shape, mesh, rules))
    return logical_to_spec(None, None, mesh, rules)
  return jax.tree.map(spec, state, is_leaf=_is_var)


def state_shardings(state: Any, mesh: Mesh, rules: Rules = LOGICAL_RULES) -> Any:
  """nnx.State (concrete or from ``nnx.eval_shape``) -> same tree of NamedShardings.

  Usable as jit ``in_shardings`` / ``out_shardings`` for that state, or with ``jax.device_put``.
  """
  specs = state_specs(state, mesh, rules)
  return jax.tree.map(lambda p: NamedSharding(mesh, p), specs,
                      is_leaf=lambda x: isinstance(x, P))


def logical_shardings(logical_tree: Any, mesh: Mesh, shapes: Any = None,
                      rules: Rules = LOGICAL_RULES) -> Any:
  """A tree of PartitionSpecs of *logical* names (e.g. ``KVCache.logical_axes()``) -> NamedShardings.

  ``shapes`` (same structure, arrays or ShapeDtypeStructs) enables the divisibility fallback.
  """
  is_p = lambda x: isinstance(x, P)
  if shapes is None:
    return jax.tree.map(lambda p: NamedSharding(mesh, logical_to_spec(tuple(p), None, mesh, rules)),
                        logical_tree, is_leaf=is_p)
  return jax.tree.map(
      lambda p, a: NamedSharding(mesh, logical_to_spec(tuple(p), a.shape, mesh, rules)),
      logical_tree, shapes, is_leaf=is_p)


def shard_state(state: Any, mesh: Mesh, rules: Rules = LOGICAL_RULES) -> Any:
  """Places a concrete nnx.State on ``mesh`` per the rules. A leaf already placed so stays as it
  is. With several processes ``jax.device_put`` takes only this process's devices, so a leaf this
  process holds whole (e.g. LoRA adapters, which every process initialises alike from one seed,
  beside base weights loaded straight onto the global mesh) becomes the global array of its
  value (``jax.make_array_from_callback``; a key array, of its key data)."""
  def place(x, sharding):
    if isinstance(x, jax.Array) and x.sharding == sharding:
      return x
    if jax.process_count() == 1 or (isinstance(x, jax.Array) and not x.is_fully_addressable):
      return jax.device_put(x, sharding)
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # e.g. the adapters' dropout keys
      return jax.random.wrap_key_data(place(jax.random.key_data(x), sharding),
                                      impl=jax.random.key_impl(x))
    whole = np.asarray(x)
    return jax.make_array_from_callback(whole.shape, sharding, lambda index: whole[index])
  return jax.tree.map(place, state, state_shardings(state, mesh, rules))


def create_sharded(factory: Callable[[], Any], mesh: Mesh, rules: Rules = LOGICAL_RULES) -> Any:
  """Builds an NNX module directly sharded on ``mesh``, never materialising it on one device.

  ``factory`` is e.g. ``lambda: Llama(cfg, rngs=nnx.Rngs(0))``; shapes come from ``nnx.eval_shape``
  and the initialiser runs under jit with the rules' output shardings.
  """
  graphdef, abstract_state = nnx.split(nnx.eval_shape(factory))
  shardings = state_shardings(abstract_state, mesh, rules)

  @functools.partial(jax.jit, out_shardings=shardings)
  def init():
    return nnx.split(factory())[1]

  with jax.set_mesh(mesh):
    state = init()
  return nnx.merge(graphdef, state)


def replicated_fraction(tree: Any) -> float:
  """Fraction (by bytes) of the arrays in ``tree`` that are fully replicated across their devices.

  Leaves must carry ``.sharding`` (placed arrays, or ShapeDtypeStructs with a sharding). Single-device
  arrays count as replicated. Use it as a startup check that the rules actually shard the model.
  """
  total = replicated = 0
  for leaf in jax.tree.leaves(tree):
    if not hasattr(leaf, "shape"):
      continue
    nbytes = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
    total += nbytes
    sh = getattr(leaf, "sharding", None)
    if sh is None or sh.is_fully_replicated:
      replicated += nbytes
  return replicated / total if total else 0.0


def bytes_per_device(abstract_state: Any, mesh: Mesh | Mapping[str, int],
                     rules: Rules = LOGICAL_RULES) -> int:
  """Largest per-device parameter bytes for ``abstract_state`` on a mesh (or {axis: size}).

  Works on ``nnx.eval_shape`` output, so it needs no devices: ``{"data": 1, "fsdp": 64}`` estimates
  a pod slice. Shards are rounded up (ceil division) per dimension.
  """
  sizes = _axis_sizes(mesh)
  specs = state_specs(abstract_state, sizes, rules)
  total = 0
  vars_ = jax.tree.leaves(abstract_state, is_leaf=_is_var)
  spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
  for v, spec in zip(vars_, spec_leaves):
    shape = list(v.shape)
    for i, entry in enumerate(spec):
      if entry is None:
        continue
      axes = (entry,) if isinstance(entry, str) else entry
      shape[i] = -(-shape[i] // math.prod(sizes[a] for a in axes))
    total += math.prod(shape) * np.dtype(v.dtype).itemsize
  return total


# ------------------------------------------------------------------------------------------------
# Batches
# ------------------------------------------------------------------------------------------------


def batch_logical_axes(batch: Any) -> Any:
  """A batch's tree with a PartitionSpec of logical names per leaf: ``batch`` on the leading axis
  (``data.batches``: every leaf leads with the rows), nothing else sharded."""
  return jax.tree.map(lambda x: P("batch", *([None] * (np.ndim(x) - 1))) if np.ndim(x) else P(),
                      batch)


def batch_shardings(batch: Any, mesh: Mesh, rules: Rules = LOGICAL_RULES,
                    shapes: bool = False) -> Any:
  """A batch (arrays or ShapeDtypeStructs [rows, ...]) -> NamedShardings, rows over (data, fsdp).
  ``shapes``: drop a mesh axis that does not divide the rows (as for parameters) instead of leaving
  the error to the placement."""
  axes = batch.logical_axes() if hasattr(batch, "logical_axes") else batch_logical_axes(batch)
  return logical_shardings(axes, mesh, batch if shapes else None, rules)


def put_batch(batch: Any, mesh: Mesh, rules: Rules = LOGICAL_RULES) -> Any:
  """Places a host batch (numpy, this process's rows) on ``mesh`` as global arrays.

  Multi-host: each process passes its own rows (e.g. from a grain pipeline sharded by process).
  The global batch size must be divisible by data * fsdp.
  """
  sizes = _axis_sizes(mesh)
  div = math.prod(sizes.get(a, 1) for a in ("data", "fsdp"))
  shardings = batch_shardings(batch, mesh, rules)

  def put(a, sh):
    a = np.asarray(a)
    if a.ndim and (a.shape[0] * jax.process_count()) % div:
      raise InputError(f"batch: batch_size: expected a multiple of data*fsdp ({div}), "
                       f"got {a.shape[0] * jax.process_count()}")
    return jax.make_array_from_process_local_data(sh, a)

  return jax.tree.map(put, batch, shardings)
