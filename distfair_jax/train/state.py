"""Train state: the optax optimizer and schedule, and the state pytree the step carries.

A model is split once, at the edge (``model.loader``), into ``graphdef, params, rngs, frozen``:
``params`` are the trainable variables (all ``nnx.Param`` for full fine-tuning, only the
``nnx.LoRAParam`` adapters with LoRA), ``rngs`` the dropout RNG state (empty without dropout) and
``frozen`` everything else (the base weights under LoRA). The step carries ``TrainState(step, params,
opt_state, rngs)`` and donates it; ``frozen`` and the reference parameters are inputs only.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from distfair_jax.config import OptimConfig

__all__ = ["TrainState", "make_schedule", "make_optimizer", "current_learning_rate",
           "init_train_state", "abstract_train_state"]


@flax.struct.dataclass
class TrainState:
  """step: [] int32; params: trainable nnx.State; opt_state: optax state; rngs: nnx.State."""
  step: jax.Array
  params: Any
  opt_state: Any
  rngs: Any


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  """The schedule's shape, peak 1: linear warmup from 0 over ``warmup_steps`` optimizer steps, then
  constant, or cosine to 0 at ``total_steps``. The learning rate is ``learning_rate * shape(step)``."""
  warmup = max(0, min(cfg.warmup_steps, max(total_steps - 1, 0)))
  if cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, 1.0, warmup,
                                              decay_steps=max(total_steps, warmup + 1), end_value=0.0)
  if warmup == 0:
    return optax.constant_schedule(1.0)
  return optax.join_schedules([optax.linear_schedule(0.0, 1.0, warmup), optax.constant_schedule(1.0)],
                              [warmup])


def _scaled(direction: optax.GradientTransformation, shape: optax.Schedule, weight_decay: float):
  """(decoupled weight decay, schedule shape, -learning_rate) after an update direction; the
  learning rate is a hyper-parameter in the optimizer state (``optax.inject_hyperparams``), not a
  constant of the compiled step, so runs that differ only in learning rate share one compiled step."""
  def factory(learning_rate):
    return optax.chain(direction,
                       optax.add_decayed_weights(weight_decay) if weight_decay else optax.identity(),
                       optax.scale_by_schedule(shape), optax.scale(-1.0 * learning_rate))
  return optax.inject_hyperparams(factory)


def make_optimizer(cfg: OptimConfig, total_steps: int):
  """-> (optax transformation, schedule shape). Global-norm clipping, then AdamW (decoupled weight
  decay, as ``optax.adamw``), RMSprop or SGD with momentum; ``grad_accum > 1`` wraps it in
  ``optax.MultiSteps`` (one update per ``grad_accum`` calls). ``current_learning_rate(opt_state,
  shape, step)`` reads the rate back for logging."""
  shape = make_schedule(cfg, total_steps)
  if cfg.optimizer == "adamw":
    direction = optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
  elif cfg.optimizer == "rmsprop":
    direction = optax.scale_by_rms(decay=cfg.b2, eps=cfg.eps)
  elif cfg.optimizer == "sgd":
    direction = optax.trace(decay=cfg.b1) if cfg.b1 else optax.identity()
  else:
    raise ValueError(f"unknown optimizer {cfg.optimizer!r} (adamw, rmsprop, sgd)")
  opt = _scaled(direction, shape, cfg.weight_decay)(learning_rate=cfg.learning_rate)
  tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt) if cfg.clip_norm > 0 else opt
  if cfg.grad_accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum)
  return tx, shape


def current_learning_rate(opt_state, shape: optax.Schedule, step) -> jax.Array:
  """learning_rate (from the optimizer state) * shape(optimizer step)."""
  lr = optax.tree_utils.tree_get(opt_state, "learning_rate")
  return lr * shape(step)


def _opt_shardings(tx: optax.GradientTransformation, params, replicated):
  """(abstract optimizer state, its shardings): moments like their parameters (``params`` carry
  shardings), counters replicated (``optax.tree_utils.tree_map_params``)."""
  param_shardings = jax.tree.map(lambda x: x.sharding, params)
  abstract = jax.eval_shape(tx.init, params)
  return abstract, optax.tree_utils.tree_map_params(tx, lambda _, s: s, abstract, param_shardings,
                                                    transform_non_params=lambda _: replicated)


def init_train_state(tx: optax.GradientTransformation, params, rngs, mesh) -> TrainState:
  """A step-0 ``TrainState`` placed on ``mesh``: optimizer moments sharded like their parameters,
  counters and RNG state replicated."""
  replicated = NamedSharding(mesh, PartitionSpec())
  _, opt_shardings = _opt_shardings(tx, params, replicated)
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
  rngs = jax.device_put(rngs, replicated)
  step = jax.device_put(jnp.zeros((), jnp.int32), replicated)
  return TrainState(step=step, params=params, opt_state=opt_state, rngs=rngs)


def abstract_train_state(tx: optax.GradientTransformation, params, rngs, mesh) -> TrainState:
  """The ``TrainState`` of ``init_train_state`` as ShapeDtypeStructs with their shardings, from
  abstract ``params`` and ``rngs`` that carry theirs (nothing allocated; for ``distfair plan``)."""
  replicated = NamedSharding(mesh, PartitionSpec())
  abstract, opt_shardings = _opt_shardings(tx, params, replicated)
  sds = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
  return TrainState(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated), params=params,
                    opt_state=jax.tree.map(sds, abstract, opt_shardings),
                    rngs=jax.tree.map(lambda a: sds(a, replicated), rngs))
