"""Train state: which parameters train, the optax optimizer, and the state pytree the step carries.

A model is split once, at the edge, into

    graphdef, params, rngs, frozen = nnx.split(model, trainable, nnx.RngState, ...)

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
from flax import nnx

from distfair_jax.config import OptimConfig

__all__ = ["TrainState", "trainable_filter", "split_model", "make_schedule", "make_optimizer",
           "count_params", "init_train_state"]


@flax.struct.dataclass
class TrainState:
  """step: [] int32; params: trainable nnx.State; opt_state: optax state; rngs: nnx.State."""
  step: jax.Array
  params: Any
  opt_state: Any
  rngs: Any


def trainable_filter(lora: bool):
  """The nnx filter of the trained variables: adapters under LoRA, every Param otherwise."""
  return nnx.LoRAParam if lora else nnx.Param


def split_model(model, lora: bool):
  """-> (graphdef, params, rngs, frozen); see the module docstring."""
  return nnx.split(model, trainable_filter(lora), nnx.RngState, ...)


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 over ``warmup_steps`` optimizer steps, then constant or cosine to 0."""
  warmup = max(0, min(cfg.warmup_steps, max(total_steps - 1, 0)))
  if cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, warmup,
                                              decay_steps=max(total_steps, warmup + 1), end_value=0.0)
  if warmup == 0:
    return optax.constant_schedule(cfg.learning_rate)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, cfg.learning_rate, warmup), optax.constant_schedule(cfg.learning_rate)],
      [warmup])


def make_optimizer(cfg: OptimConfig, total_steps: int):
  """-> (optax transformation, schedule). Global-norm clipping, then AdamW / RMSprop / SGD;
  ``grad_accum > 1`` wraps it in ``optax.MultiSteps`` (one update per ``grad_accum`` calls)."""
  schedule = make_schedule(cfg, total_steps)
  if cfg.optimizer == "adamw":
    opt = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
  elif cfg.optimizer == "rmsprop":
    opt = optax.chain(optax.scale_by_rms(decay=cfg.b2, eps=cfg.eps),
                      optax.add_decayed_weights(cfg.weight_decay),
                      optax.scale_by_learning_rate(schedule))
  elif cfg.optimizer == "sgd":
    opt = optax.sgd(schedule, momentum=cfg.b1 or None)
  else:
    raise ValueError(f"unknown optimizer {cfg.optimizer!r} (adamw, rmsprop, sgd)")
  tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt) if cfg.clip_norm > 0 else opt
  if cfg.grad_accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum)
  return tx, schedule


def count_params(tree) -> int:
  return int(sum(x.size for x in jax.tree.leaves(tree) if hasattr(x, "size")))


def zeros_like_tree(tree):
  return jax.tree.map(jnp.zeros_like, tree)


def init_train_state(tx: optax.GradientTransformation, params, rngs, mesh) -> TrainState:
  """A step-0 ``TrainState`` placed on ``mesh``: optimizer moments sharded like their parameters
  (``optax.tree_utils.tree_map_params``), counters and RNG state replicated."""
  from jax.sharding import NamedSharding, PartitionSpec
  replicated = NamedSharding(mesh, PartitionSpec())
  param_shardings = jax.tree.map(lambda x: x.sharding, params)
  abstract = jax.eval_shape(tx.init, params)
  opt_shardings = optax.tree_utils.tree_map_params(
      tx, lambda _, s: s, abstract, param_shardings,
      transform_non_params=lambda _: replicated)
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
  rngs = jax.device_put(rngs, replicated)
  step = jax.device_put(jnp.zeros((), jnp.int32), replicated)
  return TrainState(step=step, params=params, opt_state=opt_state, rngs=rngs)
