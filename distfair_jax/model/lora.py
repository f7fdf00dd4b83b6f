"""Low-rank adapters (LoRA) over chosen linear projections of a ``Llama``.

``apply_lora(model, targets=("q_proj", "v_proj"), rank=8, alpha=16)`` replaces each targeted projection
``W`` (an ``nnx.Linear``-like module with ``kernel [in, out]``) in place by ``LoRALinear``:

    y = W(x) + dropout(x) @ lora_a @ lora_b * (alpha / rank)

with ``lora_a [in, rank]`` (variance-scaling init) and ``lora_b [rank, out]`` (zeros, so the adapted model
starts equal to the base model). The adapter weights are ``nnx.LoRAParam`` variables, so
``nnx.split(model, nnx.LoRAParam, ...)`` separates them from the frozen base weights; they carry the
base kernel's logical axis names on their outer dimension, so they shard like the base.

``targets`` may name ``all-linear`` (PEFT's convention): every linear projection of the family's
attention and MLP blocks (``linear_projections``: Llama, Qwen2 and Gemma 2 have q, k, v, o, gate, up
and down), never the embedding or the output projection.

``merge_lora(model)`` folds the adapters into the base kernels and restores the plain module tree (the
Hugging Face layout the converter expects).

A model with ``scan_layers`` (every layer parameter stacked on a leading ``layers`` axis) gets
stacked adapters: each is built by ``nnx.vmap`` over split keys, so ``lora_a [layers, in, rank]``,
``lora_b [layers, rank, out]`` and one dropout stream per layer, scanned with the layer.

flax's own ``nnx.LoRA`` has neither the alpha / rank scaling nor dropout that the paper's recipe (PEFT's
definition) uses, hence this small module.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["LoRALinear", "apply_lora", "merge_lora", "linear_projections", "resolve_targets",
           "ALL_LINEAR"]

ALL_LINEAR = "all-linear"
_CANONICAL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _axis_names(var: nnx.Variable) -> tuple | None:
  names = var.get_metadata().get("out_sharding")
  return tuple(names) if names else None


class LoRALinear(nnx.Module):
  """A frozen base projection plus a trainable low-rank update.

  x: [..., in] -> [..., out]
  """

  def __init__(self, base: nnx.Module, *, rank: int, alpha: float, dropout: float = 0.0,
               rngs: nnx.Rngs, param_dtype=jnp.float32):
    if rank < 1:
      raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    in_features, out_features = base.kernel.shape
    names = _axis_names(base.kernel)
    a_names = (names[0], None) if names else None
    b_names = (None, names[1]) if names else None
    init_a = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")  # kaiming-uniform(a=sqrt 5)
    a = init_a(rngs.params(), (in_features, rank), param_dtype)
    b = jnp.zeros((rank, out_features), param_dtype)
    self.base = base
    # eager_sharding=False: placed on a mesh by distfair_jax.sharding, like the base weights.
    self.lora_a = nnx.LoRAParam(a, **({"out_sharding": a_names, "eager_sharding": False}
                                      if a_names else {}))
    self.lora_b = nnx.LoRAParam(b, **({"out_sharding": b_names, "eager_sharding": False}
                                      if b_names else {}))
    self.rank = rank
    self.alpha = float(alpha)
    self.scale = float(alpha) / rank
    self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.base(x)
    h = self.dropout(x) if self.dropout is not None else x
    delta = (h.astype(y.dtype) @ self.lora_a[...].astype(y.dtype)) @ self.lora_b[...].astype(y.dtype)
    return y + delta * jnp.asarray(self.scale, y.dtype)

  def merged_kernel(self) -> jax.Array:
    """base kernel + lora_a @ lora_b * scale, in the base kernel's dtype: [in, out] (or
    [layers, in, out], stacked)."""
    k = self.base.kernel[...]
    delta = (self.lora_a[...].astype(jnp.float32) @ self.lora_b[...].astype(jnp.float32)) * self.scale
    return (k.astype(jnp.float32) + delta).astype(k.dtype)


def _projection_owners(model) -> Iterable[tuple[str, nnx.Module, int]]:
  """(path, module, stacked layers or 0) of every attention and MLP block of a Llama."""
  if model.config.scan_layers:
    n = model.config.num_hidden_layers
    yield "layers.self_attn", model.layers.self_attn, n
    yield "layers.mlp", model.layers.mlp, n
    return
  for i, layer in enumerate(model.layers):
    yield f"layers.{i}.self_attn", layer.self_attn, 0
    yield f"layers.{i}.mlp", layer.mlp, 0


def _adapter(base: nnx.Module, stacked: int, rngs: nnx.Rngs, **kwargs) -> LoRALinear:
  """``LoRALinear(base)``; over ``stacked`` layers, one per layer, stacked like ``base``."""
  make = lambda base, rngs: LoRALinear(base, rngs=rngs, param_dtype=base.kernel[...].dtype,
                                       **kwargs)
  if not stacked:
    return make(base, rngs)

  @nnx.split_rngs(splits=stacked)
  @nnx.vmap(in_axes=(0, 0), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def per_layer(base, rngs):
    return make(base, rngs)

  return per_layer(base, rngs)


def linear_projections(model) -> tuple[str, ...]:
  """The names of the linear projections of ``model``'s attention and MLP blocks (the targets a
  LoRA adapter may wrap), in the order the blocks declare them."""
  names: list[str] = []
  for _, owner, _ in _projection_owners(model):
    for name, mod in vars(owner).items():
      if isinstance(mod, (nnx.Linear, LoRALinear)) and name not in names:
        names.append(name)
  order = {n: i for i, n in enumerate(_CANONICAL)}  # a scanned block lists its fields sorted
  return tuple(sorted(names, key=lambda n: (order.get(n, len(order)), n)))


def resolve_targets(model, targets: Sequence[str]) -> tuple[str, ...]:
  """``targets`` with ``all-linear`` expanded to ``linear_projections(model)``; raises ValueError
  naming a target the family lacks and the family's list."""
  available = linear_projections(model)
  family = getattr(model.config, "model_type", type(model).__name__)
  out: list[str] = []
  for name in targets:
    for t in (available if name == ALL_LINEAR else (name,)):
      if t not in available:
        raise ValueError(f"{t!r} is not a linear projection of {family} (expected {ALL_LINEAR} or "
                         f"some of {', '.join(available)})")
      if t not in out:
        out.append(t)
  if not out:
    raise ValueError(f"expected {ALL_LINEAR} or some of {', '.join(available)}, got none")
  return tuple(out)


def apply_lora(model, targets: Sequence[str] = ("q_proj", "v_proj"), *, rank: int = 8,
               alpha: float = 16.0, dropout: float = 0.0, seed: int = 0):
  """Wrap each targeted projection of ``model`` in a ``LoRALinear``, in place; returns ``model``.

  targets: projection attribute names (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)
  or ``all-linear`` (all of them).
  """
  targets = resolve_targets(model, targets)
  rngs = nnx.Rngs(params=seed, dropout=seed + 1)
  for _, owner, stacked in _projection_owners(model):
    for name in targets:
      base = getattr(owner, name, None)
      if base is None:
        continue
      if isinstance(base, LoRALinear):
        raise ValueError(f"{name} already carries a LoRA adapter")
      setattr(owner, name, _adapter(base, stacked, rngs, rank=rank, alpha=alpha, dropout=dropout))
  return model


def merge_lora(model):
  """Fold every adapter into its base kernel and put the base module back, in place; returns model."""
  for _, owner, _ in _projection_owners(model):
    for name, mod in list(vars(owner).items()):
      if isinstance(mod, LoRALinear):
        base = mod.base
        base.kernel[...] = mod.merged_kernel()
        setattr(owner, name, base)
  return model
