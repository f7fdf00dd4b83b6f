"""The train step: one pure function ``(state, frozen, reference, batch) -> (state, metrics)``, and the
held-out evaluation function, both built from a stage's loss (``train.stages``).

``stage_step`` builds a stage's step (optimizer, loss, update) in the one way ``distfair train``,
``distfair plan`` and the benchmarks all use. ``CompiledStep`` jit-compiles the step with the state donated and its output shardings fixed, once
per batch shape (one per length bucket), ahead of time, and reports the compiled program's memory.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec

from distfair_jax.train.stages.common import steering_mae_fn
from distfair_jax.config import OptimConfig
from distfair_jax.train.state import TrainState, current_learning_rate, make_optimizer

__all__ = ["make_train_step", "make_eval_fn", "StageStep", "stage_step", "CompiledStep",
           "memory_line"]


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    grad_accum: int = 1) -> Callable:
  """-> step(state, frozen, ref_params, batch) -> (state, metrics): one optax update (or one
  micro-step of ``optax.MultiSteps`` when grad_accum > 1)."""

  def step(state: TrainState, frozen, ref_params, batch):
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (metrics, new_rngs)), grads = grad_fn(state.params, state.rngs, frozen, ref_params, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics)
    metrics["grad_norm"] = optax.global_norm(grads)
    metrics["learning_rate"] = current_learning_rate(state.opt_state, schedule, state.step // grad_accum)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state, rngs=new_rngs), metrics

  return step


@dataclasses.dataclass(frozen=True)
class StageStep:
  """A stage's train step and what it is made of: the loss, the optimizer and its schedule."""
  loss_fn: Callable
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  step_fn: Callable


def stage_step(stage, graphdef, graphdef_eval, steering_ids, optim: OptimConfig,
               decay_steps: int, grad_accum: int = 1) -> StageStep:
  """``stage``'s train step on a model split (``graphdef`` in train mode, ``graphdef_eval`` for
  the forwards without gradient): the optimizer of ``optim`` decaying over ``decay_steps``
  updates, the stage's loss, ``make_train_step`` (``grad_accum`` micro-steps per update)."""
  tx, schedule = make_optimizer(optim, decay_steps)
  loss_fn = stage.loss_fn(graphdef, graphdef_eval, steering_ids)
  return StageStep(loss_fn, tx, schedule, make_train_step(loss_fn, tx, schedule, grad_accum))


def make_eval_fn(loss_fn: Callable, graphdef_eval, steering_ids=None) -> Callable:
  """-> eval(params, rngs, frozen, ref_params, batch) -> metrics (no update): the stage's loss
  metrics and, with ``steering_ids`` (a stage that trains steering tokens), ``steering_mae
  [rows]`` (``stages.common.steering_mae_fn``)."""
  mae = steering_mae_fn(graphdef_eval, steering_ids) if steering_ids is not None else None

  def eval_fn(params, rngs, frozen, ref_params, batch):
    _, (metrics, _) = loss_fn(params, rngs, frozen, ref_params, batch)
    metrics = dict(metrics)
    if mae is not None:
      metrics["steering_mae"] = mae(params, rngs, frozen, batch)
    return metrics

  return eval_fn


class CompiledStep:
  """A train step compiled ahead of time per batch shape, the state donated, its metrics replicated
  (every process can read them).

  ``on_first_compile(compiled)`` is called once (e.g. to report the memory of the program)."""

  def __init__(self, step_fn: Callable, state: TrainState, mesh,
               on_first_compile: Callable[[Any], None] | None = None):
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    replicated = NamedSharding(mesh, PartitionSpec())
    self._jit = jax.jit(step_fn, donate_argnums=(0,), out_shardings=(state_shardings, replicated))
    self._compiled: dict = {}
    self._on_first = on_first_compile

  def __call__(self, state, frozen, reference, batch):
    key = tuple(x.shape for x in jax.tree.leaves(batch))
    fn = self._compiled.get(key)
    if fn is None:
      fn = self._jit.lower(state, frozen, reference, batch).compile()
      if not self._compiled and self._on_first is not None:
        self._on_first(fn)
      self._compiled[key] = fn
    return fn(state, frozen, reference, batch)


def memory_line(name: str, compiled) -> tuple[str, dict[str, int]] | None:
  """A one-line report of a compiled program's per-device memory and its figures (None where the
  backend reports none)."""
  try:
    mem = compiled.memory_analysis()
  except Exception:  # not every backend reports it
    mem = None
  if mem is None:
    return None
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
            "generated_code_size_in_bytes")
  sizes = {f: int(getattr(mem, f, 0) or 0) for f in fields}
  line = (f"{name}: compiled step memory per device: arguments "
          f"{sizes['argument_size_in_bytes'] / 2**20:.1f} MiB, outputs "
          f"{sizes['output_size_in_bytes'] / 2**20:.1f} MiB (donated), temporaries "
          f"{sizes['temp_size_in_bytes'] / 2**20:.1f} MiB")
  return line, sizes
