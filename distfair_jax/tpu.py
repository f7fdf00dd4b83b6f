"""TPU chips and pod-slice topologies: what `distfair plan --topology` compiles for, from a CPU host.

- ``CHIPS``: per generation, a chip's HBM and dense bf16 peak (the one table; ``train.flops`` reads
  its peaks for MFU) and how libtpu describes it.
- ``parse_topology("v5e:4x4")`` -> ``Topology`` (generation and chips along each axis), or a
  one-line ``InputError`` listing the accepted forms.
- ``compile_devices(topology)``: the slice's devices as libtpu's compiler sees them
  (``jax.experimental.topologies``): compile-only devices, no TPU needed, nothing process-wide
  changed. It works under ``JAX_PLATFORMS=cpu``; libtpu (``pip install "distfair_jax[tpu]"``) must be
  installed (``libtpu_available()``). libtpu logs warnings on stderr when it loads without
  ``TPU_WORKER_HOSTNAMES`` / ``TPU_ACCELERATOR_TYPE`` (``quiet_env`` gives a child process both).
- ``out_of_memory(error)``: the figures of the compiler's "does not fit in HBM" error (the TPU
  compiler refuses a program larger than the chip's HBM, so there is no memory analysis then).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
from distfair_jax.errors import InputError

__all__ = ["Chip", "CHIPS", "Topology", "OutOfMemory", "ACCEPTED_FORMS", "parse_topology",
           "libtpu_available", "compile_devices", "quiet_env", "out_of_memory", "step_seconds",
           "chip_of_kind", "LIBTPU_MISSING"]


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU chip: ``hbm_gib`` of HBM, ``peak_tflops`` dense bf16 TFLOP/s. ``device_kind`` is
  ``jax.Device.device_kind``; ``dims`` the torus' dimensions; ``megacore``: its two TensorCores
  are one JAX device (libtpu's ``megacore`` chip config); ``cores_in_name``: the Cloud TPU name
  counts TensorCores (v4-8 is 4 chips)."""
  generation: str
  device_kind: str
  hbm_gib: float
  peak_tflops: float
  dims: int
  megacore: bool
  cores_in_name: bool
  cloud_prefix: str

  @property
  def hbm_bytes(self) -> int:
    return int(self.hbm_gib * 2 ** 30)


# Per chip. Sources (Cloud TPU system architecture pages):
#   v4:  https://cloud.google.com/tpu/docs/v4   32 GiB HBM2, 275 bf16 TFLOP/s
#   v5e: https://cloud.google.com/tpu/docs/v5e  16 GiB HBM2, 197 bf16 TFLOP/s
#   v5p: https://cloud.google.com/tpu/docs/v5p  95 GiB HBM2e, 459 bf16 TFLOP/s
#   v6e: https://cloud.google.com/tpu/docs/v6e  32 GiB HBM, 918 bf16 TFLOP/s
CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", "TPU v4", 32, 275.0, dims=3, megacore=True, cores_in_name=True,
               cloud_prefix="v4-"),
    "v5e": Chip("v5e", "TPU v5 lite", 16, 197.0, dims=2, megacore=False, cores_in_name=False,
                cloud_prefix="v5litepod-"),
    "v5p": Chip("v5p", "TPU v5", 95, 459.0, dims=3, megacore=True, cores_in_name=True,
                cloud_prefix="v5p-"),
    "v6e": Chip("v6e", "TPU v6 lite", 32, 918.0, dims=2, megacore=False, cores_in_name=False,
                cloud_prefix="v6e-"),
}

ACCEPTED_FORMS = ("v4:AxBxC, v5p:AxBxC, v5e:AxB or v6e:AxB, the chips along each axis (e.g. "
                  "v5e:4x4 for a v5litepod-16, v6e:2x4 for a v6e-8, v4:2x2x2 for a v4-16)")

LIBTPU_MISSING = ('needs libtpu, the TPU compiler: pip install "distfair_jax[tpu]" (or plan on '
                  'simulated CPU devices with --devices N)')

# Slices of one host that libtpu's default of 4 chips per host (2x2x1) does not describe: v5litepod-1 /
# v6e-1 (1x1) and v5litepod-8 / v6e-8 (2x4, one host of 8 chips). Any other shape goes to libtpu as it
# is, which refuses one that no slice has (e.g. v5e:2x3).
_ONE_HOST_SHAPES = {(1, 1), (2, 4)}


@dataclasses.dataclass(frozen=True)
class Topology:
  chip: Chip
  shape: tuple[int, ...]

  @property
  def name(self) -> str:
    return f"{self.chip.generation}:{'x'.join(map(str, self.shape))}"

  @property
  def num_chips(self) -> int:
    return math.prod(self.shape)

  @property
  def accelerator_type(self) -> str:
    """The Cloud TPU name of the slice, e.g. v5litepod-16, v4-16."""
    return f"{self.chip.cloud_prefix}{self.num_chips * (2 if self.chip.cores_in_name else 1)}"

  def topology_options(self) -> dict:
    """Keyword arguments of ``jax.experimental.topologies.get_topology_desc``."""
    options: dict = {"topology_name": self.name, "platform": "tpu"}
    if self.chip.megacore:
      options["chip_config_name"] = "megacore"
    if self.chip.dims == 2 and self.shape in _ONE_HOST_SHAPES:
      options["chips_per_host_bounds"] = (*self.shape, 1)
    return options


@dataclasses.dataclass(frozen=True)
class OutOfMemory:
  """The TPU compiler's refusal: ``required_bytes`` per chip against ``available_bytes`` (the
  HBM it can use, a little under the chip's)."""
  required_bytes: int
  available_bytes: int
  message: str


def parse_topology(text: str, where: str = "--topology") -> Topology:
  """``"v5e:4x4"`` -> Topology; anything else -> InputError listing ``ACCEPTED_FORMS``."""
  generation, sep, shape_text = str(text).strip().lower().partition(":")
  chip = CHIPS.get(generation)
  parts = shape_text.split("x") if sep else []
  if chip is None or len(parts) != chip.dims or not all(p.isdigit() and int(p) > 0 for p in parts):
    raise InputError(f"{where}: expected {ACCEPTED_FORMS}, got {text!r}")
  return Topology(chip, tuple(int(p) for p in parts))


def libtpu_available() -> bool:
  """Whether the TPU compiler can be loaded: the libtpu package, or ``TPU_LIBRARY_PATH``."""
  path = os.environ.get("TPU_LIBRARY_PATH")
  return bool(path and os.path.isfile(path)) or importlib.util.find_spec("libtpu") is not None


def quiet_env(topology: Topology) -> dict[str, str]:
  """Environment variables that keep libtpu from logging that it found no TPU VM around it, for a
  child process that compiles for ``topology`` (they describe the slice; nothing is contacted)."""
  return {"TPU_WORKER_HOSTNAMES": "localhost", "TPU_ACCELERATOR_TYPE": topology.accelerator_type}


def compile_devices(topology: Topology, where: str = "--topology") -> list:
  """The slice's devices for ``jax.jit(...).lower(...).compile()`` by the real TPU compiler."""
  if not libtpu_available():
    raise InputError(f"{where}: {topology.name}: {LIBTPU_MISSING}")
  import jax
  from jax.experimental import topologies
  try:
    return list(topologies.get_topology_desc(**topology.topology_options()).devices)
  except jax.errors.JaxRuntimeError as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "INVALID_ARGUMENT" not in first:
      raise
    raise InputError(f"{where}: expected a slice libtpu knows ({ACCEPTED_FORMS}), got "
                     f"{topology.name}: {first}") from None


_UNITS = {"": 1, "B": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
_SIZE = r"([\d.]+)\s*([KMGT]?)i?B?"
_OOM_PATTERNS = (
    # "... total memory required for HLO temporaries (36.00G) exceeds available HBM (15.75G)."
    re.compile(rf"required[^(]*\({_SIZE}\) exceeds available HBM \({_SIZE}\)"),
    # "Ran out of memory in memory space hbm. Used 21.38G of 15.75G hbm."
    re.compile(rf"Used {_SIZE} of {_SIZE} hbm"),
)


def _size(value: str, unit: str) -> int:
  return int(float(value) * _UNITS[unit])


def out_of_memory(error: BaseException) -> OutOfMemory | None:
  """The figures of a TPU compiler "ran out of memory on HBM" error; None for any other error."""
  text = str(error)
  if "RESOURCE_EXHAUSTED" not in text:
    return None
  first = text.strip().splitlines()[0]
  for pattern in _OOM_PATTERNS:
    m = pattern.search(text)
    if m:
      return OutOfMemory(_size(m[1], m[2]), _size(m[3], m[4]), first)
  return OutOfMemory(0, 0, first)


def step_seconds(flops_per_chip: float, chip: Chip) -> float:
  """The step time ``flops_per_chip`` takes at the chip's bf16 peak (a lower bound)."""
  return flops_per_chip / (chip.peak_tflops * 1e12)


def chip_of_kind(device_kind: str) -> Chip | None:
  """The chip of a ``jax.Device.device_kind`` (exact match: "TPU v5" is v5p, "TPU v5 lite" v5e)."""
  return next((c for c in CHIPS.values() if c.device_kind == device_kind), None)
