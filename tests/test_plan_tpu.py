"""`distfair plan --topology`: the train step compiled by the real TPU compiler (libtpu) on this CPU.

The compiling tests need libtpu (the `tpu` extra; CI installs it) and skip, saying so, without it.
They run `distfair plan` as a command: it compiles in a child process of its own (JAX_PLATFORMS=cpu,
libtpu's slice variables set), so this process never loads libtpu.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from distfair_jax import cli, tpu
from distfair_jax.plan import tpu_slice as plan_tpu
from distfair_jax.train import flops as flops_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "experiments", "tiny.yaml")
# One layer of the tiny preset, short sequences: each step compiles in seconds.
SMALL = ["model.overrides.num_hidden_layers=1", "data.max_length=32", "data.max_prompt_length=16",
         "sft.batch_size=4", "hybrid.batch_size=8"]
# Full fine-tuning of a 1-layer model with a 64k-wide MLP in float32, replicated: ~25 GiB per chip.
TOO_BIG = SMALL + ["model.overrides.hidden_size=8192", "model.overrides.intermediate_size=65536"]

needs_libtpu = pytest.mark.skipif(
    not tpu.libtpu_available(),
    reason='libtpu (the TPU compiler) is not installed: pip install "distfair_jax[tpu]"')


def _plan(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
  cmd = [sys.executable, "-m", "distfair_jax.cli", "plan", TINY, *args]
  return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------------------------------
# Without libtpu: names, the chip table, the compiler's out-of-memory message


def test_parse_topology():
  t = tpu.parse_topology("v5e:4x4")
  assert (t.name, t.num_chips, t.accelerator_type, t.chip.hbm_gib) == ("v5e:4x4", 16, "v5litepod-16", 16)
  assert tpu.parse_topology("V6E:2x4").accelerator_type == "v6e-8"
  v4 = tpu.parse_topology("v4:2x2x2")  # Cloud names count TensorCores: 8 chips are a v4-16
  assert (v4.num_chips, v4.accelerator_type, v4.topology_options()["chip_config_name"]) == \
      (8, "v4-16", "megacore")
  assert tpu.parse_topology("v6e:2x4").topology_options()["chips_per_host_bounds"] == (2, 4, 1)
  assert "chips_per_host_bounds" not in tpu.parse_topology("v5e:4x4").topology_options()
  for chip, (hbm, peak) in {"v4": (32, 275), "v5e": (16, 197), "v5p": (95, 459),
                            "v6e": (32, 918)}.items():
    assert (tpu.CHIPS[chip].hbm_gib, tpu.CHIPS[chip].peak_tflops) == (hbm, peak)
  # MFU reads the same table: v5p's device kind "TPU v5" is not v5e's "TPU v5 lite".
  kind = lambda k: type("D", (), {"device_kind": k})()
  assert flops_lib.peak_tflops(kind("TPU v5")) == 459 and flops_lib.peak_tflops(kind("TPU v5 lite")) == 197


@pytest.mark.parametrize("name", ["v5e:4x4x1", "v4:2x2", "v7:2x2", "v5litepod-16", "v5e:0x4", "v5e",
                                  "v5e:4xa", ""])
def test_bad_topology_exits_2(capsys, name):
  assert cli.main(["plan", TINY, "--topology", name, "--no-compile"]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "--topology: expected v4:AxBxC, v5p:AxBxC, v5e:AxB or v6e:AxB" in err


def test_without_libtpu_says_what_to_install(capsys, monkeypatch):
  monkeypatch.setattr(tpu, "libtpu_available", lambda: False)
  assert cli.main(["plan", TINY, *SMALL, "--topology", "v5e:2x2", "--stage", "sft"]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and 'pip install "distfair_jax[tpu]"' in err and "--devices N" in err
  # The state plan needs no compiler.
  assert cli.main(["plan", TINY, "--topology", "v5e:2x2", "--no-compile", "--json"]) == 0
  assert json.loads(capsys.readouterr().out)["devices"] == 4


def test_out_of_memory_message():
  new = RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for "
                     "HLO temporaries (21.30G) exceeds available HBM (15.75G).")
  old = RuntimeError("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in "
                     "memory space hbm. Used 21.30G of 15.75G hbm. Exceeded hbm capacity by 5.55G.")
  for e in (new, old):
    oom = tpu.out_of_memory(e)
    assert (oom.required_bytes, oom.available_bytes) == (int(21.30 * 2 ** 30), int(15.75 * 2 ** 30))
  assert tpu.out_of_memory(RuntimeError("INTERNAL: something else")) is None
  topology = tpu.parse_topology("v5e:4x4")
  step = plan_tpu.ChipStep("hybrid", topology, None, int(21.3 * 2 ** 30), 16 * 2 ** 30, 1.0)
  assert plan_tpu.does_not_fit(step) == "hybrid: 21.30 GiB per chip on v5e:4x4 (16 GiB HBM): 5.30 GiB over"


# ------------------------------------------------------------------------------------------------
# With libtpu: the real TPU compiler


@needs_libtpu
@pytest.mark.slow
def test_small_config_compiles_for_v5e_2x2():
  r = _plan(*SMALL, "--topology", "v5e:2x2", "--mesh", "data=2,fsdp=2", "--json")
  assert r.returncode == 0, r.stderr
  assert "WARNING" not in r.stderr and "E0000" not in r.stderr, r.stderr  # libtpu kept quiet
  out = json.loads(r.stdout)
  assert out["topology"]["name"] == "v5e:2x2" and out["topology"]["chips"] == 4
  assert out["topology"]["hbm_bytes_per_chip"] == 16 * 2 ** 30
  assert out["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
  state = {l["name"]: l for l in out["state"]}
  held = state["parameters (all)"]["per_device_bytes"] + state["optimizer state (adamw)"]["per_device_bytes"]
  steps = {s["stage"]: s for s in out["steps"]}
  assert set(steps) == {"sft", "hybrid"} and steps["hybrid"]["layout"] == "packed"
  for s in steps.values():
    assert s["fits"] and s["over_bytes"] == 0 and s["required_bytes"] == s["peak_bytes"]
    assert s["peak_bytes"] >= s["argument_bytes"] >= held
    assert s["alias_bytes"] >= held  # the donated state comes back in place
    assert s["flops"] > 0 and s["formula_flops"] > 0
    assert 0.5 <= s["flops"] / s["formula_flops"] <= 2.0, s
    assert s["step_seconds_at_peak"] == pytest.approx(max(s["flops"], s["formula_flops"]) / 197e12)
    assert s["compile_seconds"] > 0


@needs_libtpu
@pytest.mark.slow
def test_printed_table_on_v6e():
  r = _plan(*SMALL, "--topology", "v6e:2x4", "--mesh", "data=2,fsdp=2,tensor=2", "--stage", "sft")
  assert r.returncode == 0, r.stderr
  assert "compiled train step on v6e:2x4 (v6e-8: 8 chips, TPU v6 lite, 32 GiB HBM and 918 bf16 " \
      "TFLOP/s per chip)" in r.stdout, r.stdout
  size = r"(?:[\d.]+ [KMG]iB|\d+ B)"
  memory = re.search(rf"^sft +4 x 32 +({size}) +{size} +{size} +({size}) +({size}) +([\d.]+)%$",
                     r.stdout, re.M)
  compute = re.search(r"^sft +([\d.e+]+) +([\d.e+]+) +[\d.]+ (?:s|ms|us) +\d+ s$", r.stdout, re.M)
  assert memory and compute, r.stdout
  assert float(compute[1]) > 0 and 0.5 <= float(compute[1]) / float(compute[2]) <= 2.0


@needs_libtpu
@pytest.mark.slow
def test_too_big_exits_1_with_one_line():
  r = _plan(*TOO_BIG, "--topology", "v5e:2x2", "--mesh", "data=4", "--stage", "sft")
  assert r.returncode == 1, r.stderr
  (line,) = r.stderr.strip().splitlines()
  m = re.fullmatch(r"distfair plan: sft: ([\d.]+) GiB per chip on v5e:2x2 \(16 GiB HBM, "
                   r"([\d.]+) GiB of it usable\): ([\d.]+) GiB over", line)
  assert m, line
  need, usable, over = map(float, m.groups())
  assert need > 16 and usable <= 16 and over == pytest.approx(need - usable, abs=0.02)
  assert "sft     does not fit: needs" in r.stdout


@needs_libtpu
@pytest.mark.slow
def test_shape_libtpu_refuses_exits_2():
  r = _plan("sft.batch_size=6", "--topology", "v5e:2x3", "--mesh", "data=6", "--stage", "sft")
  assert r.returncode == 2, r.stderr
  (line,) = r.stderr.strip().splitlines()
  assert "--topology: expected a slice libtpu knows" in line and "v5e:2x3" in line
