"""The plan of a config on a TPU pod slice: each stage's train step compiled by the real TPU compiler
(libtpu, on this host's CPU; no TPU needed), per chip against the chip's HBM and bf16 peak.

``chip_step(cfg, stage, topology, devices, mesh_axes)`` compiles the exact step ``distfair train``
runs (``plan.compiled_step_memory``: same stage code, optimizer, shardings and donation) for
``devices = tpu.compile_devices(topology)`` and returns a ``ChipStep``: the compiler's
``memory_analysis()`` (arguments, outputs, aliased, temporaries; peak = arguments + outputs -
aliased + temporaries) and ``cost_analysis()`` FLOPs per chip, the step time those FLOPs take at the
chip's peak, and our FLOP formula's figure (``Stage.flops`` of the global batch / chips). The TPU
compiler refuses a program that does not fit in HBM; the ``ChipStep`` then carries its figures
(``fits`` False, no memory analysis) and ``does_not_fit()`` says so in one line.

XLA's cost analysis counts a loop body once: with ``model.scan_layers`` the decoder layers count
as one layer, and the vocabulary-tiled log-probs (``losses``: a ``lax.scan`` over 64-token tiles)
as one tile, so its FLOPs run below the formula; rematerialisation (``model.remat``) counts in the
compiler's figure, not in the formula's. The step time at peak takes the larger of the two.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Mapping, Sequence

from distfair_jax.plan import memory as plan_lib
from distfair_jax import tpu
from distfair_jax.config import Config

__all__ = ["ChipStep", "chip_step", "format_chip_steps", "chip_step_json", "topology_json",
           "does_not_fit"]


@dataclasses.dataclass(frozen=True)
class ChipStep:
  """One stage's step on a slice, per chip. ``memory`` is None when the compiler refused it
  (``required_bytes`` / ``available_bytes`` are then the compiler's figures)."""
  stage: str
  topology: tpu.Topology
  memory: plan_lib.StepMemory | None
  required_bytes: int
  available_bytes: int
  compile_seconds: float
  compiler_message: str = ""

  @property
  def hbm_bytes(self) -> int:
    return self.topology.chip.hbm_bytes

  @property
  def fits(self) -> bool:
    return self.memory is not None and self.required_bytes <= min(self.hbm_bytes,
                                                                  self.available_bytes)

  @property
  def over_bytes(self) -> int:
    return max(0, self.required_bytes - min(self.hbm_bytes, self.available_bytes))

  @property
  def step_seconds(self) -> float:
    """The larger of the compiler's and the formula's FLOPs per chip at the chip's bf16 peak: a
    lower bound of the step time (each count leaves something out, see the module docstring)."""
    if not self.memory:
      return 0.0
    return tpu.step_seconds(max(self.memory.flops, self.memory.formula_flops), self.topology.chip)

  @property
  def formula_step_seconds(self) -> float:
    return tpu.step_seconds(self.memory.formula_flops, self.topology.chip) if self.memory else 0.0


def chip_step(cfg: Config, stage: str, topology: tpu.Topology, devices: Sequence[Any],
              mesh_axes: Mapping[str, int] | None = None) -> ChipStep:
  """Compile ``stage``'s train step for the slice's ``devices`` (``tpu.compile_devices``)."""
  hbm = topology.chip.hbm_bytes
  start = time.perf_counter()
  try:
    mem = plan_lib.compiled_step_memory(cfg, stage, devices, mesh_axes)
  except Exception as e:  # the TPU compiler's "ran out of memory on HBM"; anything else propagates
    oom = tpu.out_of_memory(e)
    if oom is None:
      raise
    return ChipStep(stage, topology, None, oom.required_bytes, oom.available_bytes or hbm,
                    time.perf_counter() - start, oom.message)
  return ChipStep(stage, topology, mem, mem.peak_bytes, hbm, mem.compile_seconds)


def _gib(n: int) -> str:
  return f"{n / 2 ** 30:.2f} GiB"


def does_not_fit(step: ChipStep) -> str:
  """One line: "hybrid: 21.30 GiB per chip on v5e:4x4 (16 GiB HBM): 5.30 GiB over"."""
  chip = step.topology.chip
  usable = (f", {_gib(step.available_bytes)} of it usable" if step.available_bytes < step.hbm_bytes
            else "")
  if not step.required_bytes:  # the compiler refused without figures
    return (f"{step.stage}: does not fit on {step.topology.name} ({chip.hbm_gib:g} GiB HBM per "
            f"chip): {step.compiler_message}")
  return (f"{step.stage}: {_gib(step.required_bytes)} per chip on {step.topology.name} "
          f"({chip.hbm_gib:g} GiB HBM{usable}): {_gib(step.over_bytes)} over")


def topology_json(topology: tpu.Topology) -> dict:
  chip = topology.chip
  return {"name": topology.name, "accelerator_type": topology.accelerator_type,
          "generation": chip.generation, "device_kind": chip.device_kind,
          "chips": topology.num_chips, "hbm_bytes_per_chip": chip.hbm_bytes,
          "peak_bf16_tflops_per_chip": chip.peak_tflops}


def chip_step_json(step: ChipStep) -> dict:
  out = {"stage": step.stage, "fits": step.fits, "required_bytes": step.required_bytes,
         "available_bytes": step.available_bytes, "hbm_bytes": step.hbm_bytes,
         "over_bytes": step.over_bytes, "compile_seconds": round(step.compile_seconds, 2)}
  if step.memory is not None:
    out.update(dataclasses.asdict(step.memory), peak_bytes=step.memory.peak_bytes,
               step_seconds_at_peak=step.step_seconds,
               formula_step_seconds_at_peak=step.formula_step_seconds)
  else:
    out["compiler_message"] = step.compiler_message
  return out


def _duration(seconds: float) -> str:
  if seconds >= 1:
    return f"{seconds:.2f} s"
  return f"{seconds * 1e3:.3g} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.3g} us"


def _memory_row(step: ChipStep) -> str:
  if step.memory is None:
    need = (f"needs {_gib(step.required_bytes)} of {_gib(step.available_bytes)} usable "
            f"({_gib(step.over_bytes)} over)" if step.required_bytes else step.compiler_message)
    return f"{step.stage:<8}does not fit: {need}; the compiler gave up after {step.compile_seconds:.0f} s"
  note = plan_lib.layout_note(step.memory)
  row = f"{plan_lib.step_row(step.memory)}{step.memory.peak_bytes / step.hbm_bytes:>8.1%}"
  return row + (f"\n{note}" if note else "")


def _compute_row(step: ChipStep) -> str:
  m = step.memory
  return (f"{step.stage:<8}{m.flops:>13.3g}{m.formula_flops:>13.3g}"
          f"{_duration(step.step_seconds):>12}{step.compile_seconds:>9.0f} s")


def format_chip_steps(steps: Sequence[ChipStep], topology: tpu.Topology) -> str:
  """The per-chip tables (memory, then compute) of the steps on ``topology``."""
  chip = topology.chip
  out = [f"compiled train step on {topology.name} ({topology.accelerator_type}: "
         f"{topology.num_chips} chips, {chip.device_kind}, {chip.hbm_gib:g} GiB HBM and "
         f"{chip.peak_tflops:g} bf16 TFLOP/s per chip), per chip (the TPU compiler's "
         f"memory_analysis; outputs alias the donated state):",
         f"{plan_lib.STEP_HEADER}{'of HBM':>8}"]
  out += [_memory_row(s) for s in steps]
  compiled = [s for s in steps if s.memory is not None]
  if compiled:
    out += ["", "FLOPs per step and chip (XLA's cost_analysis; our formula's), and the step time "
            "the larger takes at the bf16 peak (no step runs faster):",
            f"{'stage':<8}{'FLOPs (XLA)':>13}{'(formula)':>13}{'at peak':>12}{'compile':>11}"]
    out += [_compute_row(s) for s in compiled]
    out.append("XLA counts a loop body once (scanned layers: one layer; the tiled log-probs: one "
               "64-token tile) and counts remat recomputation; the formula counts neither")
  return "\n".join(out)
