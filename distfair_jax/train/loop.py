"""The stage loop: train one stage from its initial parameters, with checkpoints, metrics, resume.

``run_stage(ctx, stage, init_params, sigterm)`` trains ``stage`` (``train.stages``) on the run's
records: a grain pipeline in the stage's layout, an optax optimizer, the compiled step, orbax
checkpoints (resumed from the latest complete one, data iterator included, so a resumed stage ends
with the parameters and metrics of an uninterrupted one), held-out evaluation, and the final
parameters. ``hybrid`` and ``dpo`` use the initial parameters, frozen, as the reference.

SIGTERM (TPU preemption) saves a checkpoint at the next step boundary and raises ``Preempted``
(exit code 143); a non-finite loss raises ``TrainingError`` without saving the bad state, so the
latest checkpoint is the last good one.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from distfair_jax import console
from distfair_jax import losses as L
from distfair_jax import distributed
from distfair_jax import sharding as shd
from distfair_jax.config import config_to_dict
from distfair_jax.data import pipeline
from distfair_jax.errors import InputError
from distfair_jax.train import flops as flops_lib
from distfair_jax.train.checkpoint import StageCheckpointer, abstract_like
from distfair_jax.train.heldout import HeldoutEval
from distfair_jax.train.preemption import Preempted
from distfair_jax.train.state import init_train_state
from distfair_jax.train.step import CompiledStep, memory_line, stage_step

__all__ = ["run_stage", "TrainingError", "Preempted"]


class TrainingError(RuntimeError):
  """Training cannot go on (a non-finite loss, for one); the message says what and where."""


@dataclasses.dataclass
class _Stage:
  """One stage's run: what the step loop needs besides the state."""
  name: str
  stage: Any  # with ``hybrid.reference`` resolved
  pipe: Any
  total: int
  step: CompiledStep
  heldout: HeldoutEval
  ckpt: StageCheckpointer
  reference: Any
  cache: Any  # reference_cache.PooledCache | None


def _setup(ctx, stage, init_params):
  """-> (_Stage, initial TrainState, first step, data iterator state)."""
  scfg, records = stage.cfg, ctx.train_records[stage.records_kind]
  pays = ctx.packing_pays(stage, records)
  layout = stage.layout(ctx.batch_devices, pays)
  stage.check_batch_size(layout, ctx.batch_devices)
  note = stage.layout_note(layout, lambda: ctx.packing_ratio(records))
  if note is not None:
    console.log(note)
  seed = (ctx.cfg.data.seed + stage.seed_offset) % 2**32  # data.seed is below 2**32
  pipe = pipeline.make_batches(records, ctx.encoder, stage.records_kind, scfg.batch_size,
                               seed=seed, num_epochs=scfg.epochs, layout=layout,
                               group_by_length=scfg.group_by_length,
                               **stage.batch_options())
  total = pipe.num_steps if not scfg.max_steps else min(scfg.max_steps, pipe.num_steps)
  if total < 1:
    raise InputError(f"{stage.name}: batch_size: {scfg.batch_size} is larger than the stage's "
                     f"{len(records)} training records")
  stage, make_cache = stage.reference_plan(ctx, layout, seed, total)
  accum = scfg.optim.grad_accum
  m = ctx.model
  built = stage_step(stage, m.graphdef, m.graphdef_eval, ctx.steering_ids, scfg.optim,
                     max(1, total // accum), accum)
  loss_fn = built.loss_fn
  # Copy the initial params: the state is donated to the step, the reference must survive it.
  state = init_train_state(built.tx, jax.tree.map(jnp.copy, init_params), ctx.rngs, ctx.mesh)
  step = CompiledStep(built.step_fn, state, ctx.mesh,
                      on_first_compile=lambda c: ctx.report_memory(stage.name, memory_line(
                          stage.name, c)))
  heldout = HeldoutEval(stage, ctx.heldout_records.get(stage.records_kind) or [], model=m,
                        encoder=ctx.encoder, mesh=ctx.mesh, loss_fn=loss_fn,
                        steering_ids=ctx.steering_ids, max_batches=ctx.cfg.heldout.max_batches,
                        packing_pays=pays)
  c = ctx.cfg.checkpoint
  ckpt = StageCheckpointer(ctx.run.checkpoints_dir(stage.name), keep=c.keep,
                           every_steps=c.every_steps, async_save=c.async_save)
  start, data_state = 0, None
  restored = ckpt.restore_latest(abstract_like(state), say=console.log)
  if restored is not None:
    start, state, data_state = restored
    ctx.writer.truncate_after(stage.name, start)
    console.log(f"{stage.name}: resuming from step {start} of {total}")
  reference = init_params if stage.needs_reference else None
  cache = make_cache(init_params, restored is not None) if make_cache is not None else None
  return _Stage(stage.name, stage, pipe, total, step, heldout, ckpt, reference, cache), state, \
      start, data_state


def _step_metrics(ctx, stage, metrics, batch, dt: float) -> dict[str, float]:
  out = L.drop_absent_classes({k: float(np.asarray(v)) for k, v in metrics.items()
                               if np.ndim(v) == 0})
  flops = stage.flops(ctx.model.config, batch, jax.process_count())
  out["tokens_per_second"] = out.pop("tokens", 0.0) / dt
  out["step_time"] = dt
  out["tflops_per_device"] = flops / dt / ctx.mesh.size / 1e12
  peak = flops_lib.peak_tflops(jax.devices()[0])
  if peak:
    out["mfu"] = out["tflops_per_device"] / peak
  return out


def _check_finite(run: _Stage, loss: float, step: int, where) -> None:
  if math.isfinite(loss):
    return
  run.ckpt.wait()
  last = run.ckpt.latest_step()
  raise TrainingError(
      f"{run.name}: non-finite loss ({loss}) at step {step}; stopped without saving this state; "
      f"the last good checkpoint is {'step ' + str(last) if last is not None else 'none (none was saved yet)'}"
      f" in {where}; lower the learning rate or check the data")


def run_stage(ctx, stage, init_params, sigterm) -> tuple[Any, Any, dict]:
  """Trains ``stage`` from ``init_params``; returns (final params, RNG state, summary)."""
  run, state, step, data_state = _setup(ctx, stage, init_params)
  stage = run.stage
  batches = run.pipe.iterator(data_state)
  config = config_to_dict(ctx.cfg)
  frozen, every = ctx.model.frozen, ctx.cfg.logging.every_steps
  progress = tqdm(total=run.total, initial=step, desc=run.name, unit="step", dynamic_ncols=True,
                  disable=not ctx.show_progress)
  metrics: dict[str, float] = {}
  try:
    while step < run.total:
      if distributed.any_process(sigterm.requested):  # every process stops at the same step
        ctx.writer.flush()
        run.ckpt.save(step, state, batches.get_state(), config)
        run.ckpt.close()
        msg = (f"{run.name}: SIGTERM: checkpoint saved at step {step} in "
               f"{ctx.run.stage_dir(run.name)}; rerun the same command to resume")
        console.log(msg)
        raise Preempted(msg)
      host = next(batches)
      stage.check_batch(host)
      batch = (shd.put_batch(host, ctx.mesh) if run.cache is None
               else run.cache.attach(step, host, ctx.mesh))
      t0 = time.perf_counter()
      state, out = run.step(state, frozen, run.reference, batch)
      out = jax.device_get(out)
      dt = time.perf_counter() - t0
      step += 1
      _check_finite(run, float(out["loss"]), step, ctx.run.checkpoints_dir(run.name))
      metrics = _step_metrics(ctx, stage, out, host, dt)
      if step % every == 0 or step == run.total:
        ctx.writer.write(run.name, step, metrics)
      progress.update(1)
      progress.set_postfix(loss=f"{metrics['loss']:.4f}")
      if ctx.cfg.heldout.every_steps and step % ctx.cfg.heldout.every_steps == 0 and \
          step < run.total:
        ctx.log_heldout(run.name, step, run.heldout(state.params, state.rngs, init_params))
      if run.ckpt.should_save(step):
        ctx.writer.flush()  # the metrics of every checkpointed step are durable with it
        run.ckpt.save(step, state, batches.get_state(), config)
  finally:
    progress.close()
  heldout = ctx.log_heldout(run.name, step, run.heldout(state.params, state.rngs, init_params))
  ctx.writer.flush()
  run.ckpt.save(step, state, batches.get_state(), config)
  run.ckpt.close()
  summary = {"stage": run.name, "steps": step, "train": metrics, "eval": heldout}
  ctx.run.write_final(run.name, state.params, summary)
  return state.params, state.rngs, summary
