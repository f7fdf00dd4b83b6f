"""Memory plan of a training config on a device mesh, before renting the devices.

Two parts:

- ``state_plan(cfg, mesh_sizes)``: parameter counts and the per-device bytes of the parameters, of the
  trainable parameters (LoRA adapters or all), of the optimizer state and of the initial / reference
  copy of the trainable parameters that the trainer keeps during a stage. Everything comes from
  ``nnx.eval_shape`` and ``jax.eval_shape(tx.init, ...)`` (no array is allocated, no device is needed),
  sharded by the rules of ``distfair_jax.sharding`` on a mesh given as sizes only; optimizer moments
  are sharded like their parameters (``optax.tree_utils.tree_map_params``), as ``init_train_state``
  does. Instant even for an 8B model.
- ``compiled_step_memory(cfg, stage, devices, mesh_axes)``: the stage's jit-compiled train step (the one
  ``distfair train`` runs: same loss, optimizer, shardings and donation) lowered on abstract inputs of
  the config's batch size and a length of ``data.max_length``, compiled by XLA for ``devices``, and its
  ``memory_analysis()`` per device (arguments, outputs, aliased, temporaries), with its
  ``cost_analysis()`` FLOPs per device next to the stage's FLOP formula's. For a TPU slice's
  compile-only devices (``tpu.compile_devices``; ``plan.tpu_slice`` reads the figures against the chip) this
  is what the TPU compiler builds for the slice. On a CPU with N simulated devices
  (``XLA_FLAGS=--xla_force_host_platform_device_count=N``, which ``distfair plan --devices`` sets) it
  is the partitioned program of an N-device slice; XLA's CPU and TPU backends lay temporaries out
  differently, so read that as an estimate.

A model whose ``model.checkpoint`` directory exists is sized from its ``model_config.json``; otherwise
from ``model.preset`` (the experiment configs name a placeholder checkpoint and the matching preset):
``model.loader.load_model(..., abstract=True)``. The step, its batch (``Stage.abstract_batch``, the
stage's worst case) and its layout (``Stage.layout``) come from ``train.stages``, as in training.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from distfair_jax import sharding as shd
from distfair_jax.config import Config
from distfair_jax.data import build as build_lib
from distfair_jax.errors import InputError
from distfair_jax.model.loader import load_model
from distfair_jax.train.stages import STAGES, make_stage
from distfair_jax.train.state import abstract_train_state, make_optimizer
from distfair_jax.train.step import stage_step

__all__ = ["StateLine", "StatePlan", "StepMemory", "state_plan", "compiled_step_memory",
           "batch_warnings", "parse_mesh", "format_bytes", "format_plan", "STEP_HEADER", "step_row",
           "layout_note"]



@dataclasses.dataclass(frozen=True)
class StateLine:
  """One row of the state table: ``count`` elements, ``total_bytes`` unsharded, the largest
  ``per_device_bytes`` on the mesh."""
  name: str
  count: int
  total_bytes: int
  per_device_bytes: int


@dataclasses.dataclass
class StatePlan:
  model: str
  model_source: str               # "checkpoint" | "preset"
  param_dtype: str
  lora: str                       # "" (full fine-tuning) or e.g. "rank 32 on q_proj, v_proj"
  mesh: dict[str, int]
  num_params: int
  trainable_params: int
  lines: list[StateLine]
  warnings: list[str]

  @property
  def resident(self) -> list[StateLine]:
    """The lines that add up (the trainable parameters are part of "parameters (all)")."""
    return [l for l in self.lines if l.name != "trainable parameters"]

  @property
  def total_bytes(self) -> int:
    return sum(l.total_bytes for l in self.resident)

  @property
  def per_device_total(self) -> int:
    return sum(l.per_device_bytes for l in self.resident)

  def line(self, name: str) -> StateLine:
    return next(l for l in self.lines if l.name == name)


@dataclasses.dataclass(frozen=True)
class StepMemory:
  """Per-device sizes from XLA's ``memory_analysis()`` of one compiled step."""
  stage: str
  batch_size: int
  length: int
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  layout: str = "rows"
  flops: float = 0.0             # per device, XLA's cost_analysis() (a loop body counted once)
  formula_flops: float = 0.0     # per device, the stage's FLOP formula (train.flops) / devices
  compile_seconds: float = 0.0   # lowering and compiling

  @property
  def peak_bytes(self) -> int:
    """arguments + outputs - aliased (donated state reused for the outputs) + temporaries."""
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


# ------------------------------------------------------------------------------------------------
# Model


def _abstract_model(cfg: Config, mesh=None):
  return load_model(cfg.model, cfg.lora, mesh, seed=cfg.seed, abstract=True)


# ------------------------------------------------------------------------------------------------
# State (eval_shape only)


class _Leaf:
  """An opaque pytree leaf (PartitionSpecs and shardings must not be flattened)."""
  __slots__ = ("value",)

  def __init__(self, value):
    self.value = value


def _nbytes(shape: Sequence[int], dtype) -> int:
  return math.prod(shape) * np.dtype(dtype).itemsize


def _sharded_bytes(shape: Sequence[int], dtype, spec: P, sizes: Mapping[str, int]) -> int:
  """Bytes of the largest shard of an array [shape] laid out by ``spec`` (ceil division)."""
  shape = list(shape)
  for i, entry in enumerate(spec):
    if entry is None:
      continue
    axes = (entry,) if isinstance(entry, str) else entry
    shape[i] = -(-shape[i] // math.prod(sizes[a] for a in axes))
  return _nbytes(shape, dtype)


def _stage_optim(cfg: Config, stage: str):
  return make_stage(stage, cfg).cfg.optim


def _opt_specs(tx, abstract_opt, param_specs, replicated):
  """The optimizer state's PartitionSpecs (``_Leaf``-wrapped, as ``param_specs``): moments like
  their parameters, counters replicated."""
  return optax.tree_utils.tree_map_params(tx, lambda _, s: s, abstract_opt, param_specs,
                                          transform_non_params=lambda _: _Leaf(replicated))


def _tree_bytes(tree, specs, sizes) -> tuple[int, int, int]:
  """-> (elements, total bytes, per-device bytes) of an abstract tree and its ``_Leaf`` specs."""
  leaves = jax.tree.leaves(tree)
  spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, _Leaf))
  if len(leaves) != len(spec_leaves):
    raise RuntimeError(f"internal: {len(leaves)} arrays but {len(spec_leaves)} shardings")
  count = sum(math.prod(a.shape) for a in leaves)
  total = sum(_nbytes(a.shape, a.dtype) for a in leaves)
  per_dev = sum(_sharded_bytes(a.shape, a.dtype, s.value, sizes) for a, s in zip(leaves, spec_leaves))
  return int(count), int(total), int(per_dev)


def _param_specs(state, sizes):
  return jax.tree.map(_Leaf, shd.state_specs(state, sizes), is_leaf=lambda x: isinstance(x, P))


def batch_warnings(cfg: Config, sizes: Mapping[str, int]) -> list[str]:
  """A stage whose global batch does not split over data x fsdp cannot run on this mesh."""
  div = sizes.get("data", 1) * sizes.get("fsdp", 1)
  out = []
  for name in cfg.stages:
    stage = make_stage(name, cfg)
    b = stage.cfg.batch_size
    if b % div:
      out.append(f"{name}: batch_size {b} is not a multiple of data x fsdp = {div}: that stage "
                 f"cannot run on this mesh (use a mesh with data x fsdp dividing {b}, e.g. more "
                 f"tensor parallelism, or a larger batch)")
    elif b % stage.batch_multiple(stage.layout(div), div):  # auto falls back to rows: no warning
      out.append(f"{name}: batch_size {b} holds {b // 2} pairs, not a multiple of data x fsdp = "
                 f"{div}: the packed layout puts one pair per row (double the batch, or set "
                 f"hybrid.layout: rows)")
  return out


def state_plan(cfg: Config, mesh_sizes: Mapping[str, int]) -> StatePlan:
  """Counts and per-device bytes of parameters, trainable parameters, optimizer state and the
  initial / reference copy of the trainable parameters, on a mesh given as ``{axis: size}``."""
  m = _abstract_model(cfg)
  name, source, params, frozen = m.name, m.source, m.params, m.frozen
  sizes = dict(mesh_sizes)
  lines = []
  everything = nnx.State.merge(params, frozen) if len(jax.tree.leaves(frozen)) else params
  all_specs = _param_specs(everything, sizes)
  lines.append(StateLine("parameters (all)", *_tree_bytes(everything, all_specs, sizes)))
  p_specs = _param_specs(params, sizes)
  trainable = StateLine("trainable parameters", *_tree_bytes(params, p_specs, sizes))
  lines.append(trainable)
  # The optimizer of the first stage (they share their structure; only hyper-parameters differ).
  tx, _ = make_optimizer(_stage_optim(cfg, cfg.stages[0]), 1000)
  abstract_opt = jax.eval_shape(tx.init, params)
  opt_specs = _opt_specs(tx, abstract_opt, p_specs, P())
  lines.append(StateLine(f"optimizer state ({_stage_optim(cfg, cfg.stages[0]).optimizer})",
                         *_tree_bytes(abstract_opt, opt_specs, sizes)))
  # run_stage keeps the stage's initial trainable params (the reference of hybrid / dpo) next to the
  # donated copy it trains.
  lines.append(dataclasses.replace(trainable, name="initial / reference copy"))
  lora = ""
  if cfg.lora.enabled:
    lora = f"rank {cfg.lora.rank} on {', '.join(cfg.lora.targets)}"
  return StatePlan(model=name, model_source=source, param_dtype=cfg.model.param_dtype, lora=lora,
                   mesh=sizes, num_params=lines[0].count, trainable_params=trainable.count,
                   lines=lines, warnings=batch_warnings(cfg, sizes))


# ------------------------------------------------------------------------------------------------
# Compiled step


def _num_categories(cfg: Config) -> int:
  return build_lib.resolve_spec(cfg.data.spec or cfg.data.dataset).attribute.num_categories


@dataclasses.dataclass(frozen=True)
class _LoweredStep:
  lowered: Any            # jax.stages.Lowered
  stage: Any              # train.stages.StageBase
  model_config: Any       # LlamaConfig
  batch: Any              # the abstract global batch
  layout: str
  num_devices: int


def _lower_step(cfg: Config, stage_name: str, devices: Sequence[jax.Device],
                mesh_axes: Mapping[str, int] | None) -> _LoweredStep:
  """``stage_name``'s train step as ``distfair train`` jits it, lowered on abstract inputs."""
  if stage_name not in STAGES:
    raise InputError(f"plan: stage: expected one of {', '.join(STAGES)}, got {stage_name!r}")
  stage = make_stage(stage_name, cfg)
  mesh = shd.make_mesh(dict(mesh_axes if mesh_axes is not None else dataclasses.asdict(cfg.mesh)),
                       devices)
  sizes = dict(mesh.shape)
  div = sizes["data"] * sizes["fsdp"]
  layout = stage.layout(div)  # auto assumes packing pays: the plan sees no data
  b, length = stage.cfg.batch_size, cfg.data.max_length
  multiple = stage.batch_multiple(layout, div)
  if b % multiple:
    twice = ", x 2 for hybrid.layout packed" if multiple != div else ""
    raise InputError(f"{stage.section}.batch_size: expected a multiple of {multiple} "
                     f"(data x fsdp{twice}) on mesh {sizes}, got {b}")
  m = _abstract_model(cfg, mesh)
  k = _num_categories(cfg)
  steering_ids = jnp.arange(k, dtype=jnp.int32)  # values do not matter for sizing
  built = stage_step(stage, m.graphdef, m.graphdef_eval, steering_ids, stage.cfg.optim, 1000,
                     stage.cfg.optim.grad_accum)
  state = abstract_train_state(built.tx, m.params, m.rngs, mesh)
  batch = stage.abstract_batch(length, k, layout)
  batch = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), batch,
                       shd.batch_shardings(batch, mesh, shapes=True))
  ref = m.params if stage.needs_reference else None
  state_sh = jax.tree.map(lambda x: x.sharding, state)
  jitted = jax.jit(built.step_fn, donate_argnums=(0,), out_shardings=(state_sh, None))
  return _LoweredStep(jitted.lower(state, m.frozen, ref, batch), stage, m.config, batch, layout,
                      len(devices))


def _compiled_flops(compiled) -> float:
  """``cost_analysis()["flops"]`` of a compiled program (a dict, or a list of one per program)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", 0.0) or 0.0)


def compiled_step_memory(cfg: Config, stage_name: str, devices: Sequence[jax.Device],
                         mesh_axes: Mapping[str, int] | None = None) -> StepMemory:
  """Lower and compile ``stage_name``'s train step on abstract inputs for ``devices``: its memory
  and FLOPs per device. A compiler error (e.g. the TPU compiler's out of HBM) propagates."""
  start = time.perf_counter()
  step = _lower_step(cfg, stage_name, devices, mesh_axes)
  compiled = step.lowered.compile()
  seconds = time.perf_counter() - start
  mem = compiled.memory_analysis()
  get = lambda f: int(getattr(mem, f, 0) or 0) if mem is not None else 0
  formula = step.stage.flops(step.model_config, step.batch) / step.num_devices
  return StepMemory(stage=stage_name, batch_size=step.stage.cfg.batch_size,
                    length=cfg.data.max_length, layout=step.layout,
                    argument_bytes=get("argument_size_in_bytes"),
                    output_bytes=get("output_size_in_bytes"),
                    alias_bytes=get("alias_size_in_bytes"),
                    temp_bytes=get("temp_size_in_bytes"),
                    code_bytes=get("generated_code_size_in_bytes"),
                    flops=_compiled_flops(compiled), formula_flops=formula,
                    compile_seconds=seconds)


# ------------------------------------------------------------------------------------------------
# Mesh argument and output


def parse_mesh(text: str | None, default: Mapping[str, int], num_devices: int,
               where: str = "--mesh") -> dict[str, int]:
  """``"data=1,fsdp=16,tensor=1"`` (missing axes: 1; -1 fills) -> resolved sizes for ``num_devices``.
  ``None`` resolves ``default`` (the config's mesh)."""
  if text is None:
    axes = dict(default)
  else:
    axes = {}
    for part in text.split(","):
      name, sep, value = part.strip().partition("=")
      if not sep or not name.strip():
        raise InputError(f"{where}: expected axis=size pairs like data=1,fsdp=16,tensor=1, "
                         f"got {text!r}")
      try:
        axes[name.strip()] = int(value)
      except ValueError:
        raise InputError(f"{where}: {name.strip()}: expected an integer, got {value!r}") from None
    for axis in shd.MESH_AXES:
      axes.setdefault(axis, 1)
  try:
    return shd.mesh_shape(axes, num_devices)
  except InputError as e:
    raise InputError(f"{where}: {e}") from None


def format_bytes(n: int) -> str:
  for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
    if n >= scale:
      return f"{n / scale:.2f} {unit}"
  return f"{n} B"


STEP_HEADER = (f"{'stage':<8}{'batch x len':>13}{'arguments':>12}{'outputs':>12}{'aliased':>12}"
               f"{'temporaries':>13}{'peak':>12}")


def step_row(s: StepMemory) -> str:
  """One row under ``STEP_HEADER``."""
  return (f"{s.stage:<8}{f'{s.batch_size} x {s.length}':>13}{format_bytes(s.argument_bytes):>12}"
          f"{format_bytes(s.output_bytes):>12}{format_bytes(s.alias_bytes):>12}"
          f"{format_bytes(s.temp_bytes):>13}{format_bytes(s.peak_bytes):>12}")


def layout_note(s: StepMemory) -> str:
  """What a packed step was sized for ("" for the rows layout)."""
  if s.layout == "packed" and s.stage == "hybrid":
    return (f"{'':<8}packed layout sized for its worst case: {s.batch_size // 2} rows x "
            f"{4 * s.length} tokens (a row holds a prompt and four completions, each "
            f"sequence <= {s.length}; the demo's pairs pack into 64)")
  if s.layout == "packed":
    return (f"{'':<8}packed layout sized for its worst case: {s.batch_size} rows x "
            f"{2 * s.length} tokens (a prompt, then chosen and rejected)")
  return ""


def format_plan(plan: StatePlan, steps: Sequence[StepMemory], num_devices: int,
                skipped: str = "") -> str:
  """The human-readable tables."""
  src = "" if plan.model_source == "checkpoint" else " (preset shape)"
  mode = f"LoRA {plan.lora}" if plan.lora else "full fine-tuning"
  mesh = " ".join(f"{k}={v}" for k, v in plan.mesh.items())
  out = [f"model: {plan.model}{src}, {plan.param_dtype} parameters, {mode}",
         f"mesh: {num_devices} devices: {mesh}", ""]
  w = (30, 16, 12, 12)
  out.append(f"{'state':<{w[0]}}{'elements':>{w[1]}}{'total':>{w[2]}}{'per device':>{w[3]}}")
  for l in plan.lines:
    out.append(f"{l.name:<{w[0]}}{l.count:>{w[1]},}{format_bytes(l.total_bytes):>{w[2]}}"
               f"{format_bytes(l.per_device_bytes):>{w[3]}}")
  out.append(f"{'resident state':<{w[0]}}{'':>{w[1]}}{format_bytes(plan.total_bytes):>{w[2]}}"
             f"{format_bytes(plan.per_device_total):>{w[3]}}")
  if steps:
    out += ["", "compiled train step, per device (XLA memory_analysis; outputs alias the donated state):",
            STEP_HEADER]
    for s in steps:
      out += [step_row(s)] + ([layout_note(s)] if layout_note(s) else [])
  elif skipped:
    out += ["", skipped]
  for warning in plan.warnings:
    out.append(f"warning: {warning}")
  return "\n".join(out)
