"""`distfair plan`: sizes agree with jax.eval_shape; the compiled step on simulated devices."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from distfair_jax import cli
from distfair_jax.config import load_config
from distfair_jax import sharding as shd
from distfair_jax.model import lora as lora_lib
from distfair_jax.model.llama import Llama
from distfair_jax.model.presets import get_preset
from distfair_jax.train.state import make_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "experiments", "gender_real_uk", "llama3.2-1b.yaml")
MESH = {"data": 1, "fsdp": 16, "tensor": 1}

jax.devices()  # start the 8-device CPU backend of conftest before `plan` could reconfigure it


def _plan(capsys, *args) -> dict:
  assert cli.main(["plan", CONFIG, *args, "--devices", "16", "--mesh", "data=1,fsdp=16,tensor=1",
                   "--no-compile", "--json"]) == 0
  return json.loads(capsys.readouterr().out)


def _bytes(tree) -> int:
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _count(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def abstract_1b():
  """The llama3.2-1b experiment's model (bf16, LoRA rank 32 on q/v), built with nnx.eval_shape."""
  cfg = get_preset("llama3.2-1b", dtype="bfloat16", param_dtype="bfloat16", remat="full")

  def factory():
    return lora_lib.apply_lora(Llama(cfg, rngs=nnx.Rngs(0)), ("q_proj", "v_proj"), rank=32,
                               alpha=16.0, dropout=0.05)

  return nnx.eval_shape(factory)


def test_lora_plan_agrees_with_eval_shape(capsys, abstract_1b):
  out = _plan(capsys)
  state = {l["name"]: l for l in out["state"]}
  everything = nnx.state(abstract_1b, nnx.Param)  # base weights and adapters (no dropout RNG state)
  adapters = nnx.state(abstract_1b, nnx.LoRAParam)
  assert out["num_params"] == _count(everything)
  assert out["trainable_params"] == _count(adapters)
  # 16 layers x (q: 2048x32 + 32x2048; v: 2048x32 + 32x512)
  assert out["trainable_params"] == 16 * (2048 * 32 + 32 * 2048 + 2048 * 32 + 32 * 512)
  assert state["parameters (all)"]["total_bytes"] == _bytes(everything)
  assert state["parameters (all)"]["per_device_bytes"] == shd.bytes_per_device(everything, MESH)
  assert state["trainable parameters"]["per_device_bytes"] == shd.bytes_per_device(adapters, MESH)
  tx, _ = make_optimizer(load_config(CONFIG).sft.optim, 1000)  # clipping, AdamW, warmup schedule
  opt = jax.eval_shape(tx.init, adapters)
  assert state["optimizer state (adamw)"]["total_bytes"] == _bytes(opt)
  # two moments in the adapters' dtype, plus step counters
  assert 0 <= _bytes(opt) - 2 * _bytes(adapters) <= 64
  assert _bytes(jax.eval_shape(optax.adamw(1e-4).init, adapters)) - 2 * _bytes(adapters) == 4
  assert state["initial / reference copy"]["total_bytes"] == _bytes(adapters)
  assert out["resident_bytes_per_device"] == sum(
      state[k]["per_device_bytes"] for k in ("parameters (all)", "optimizer state (adamw)",
                                             "initial / reference copy"))
  # SFT batch 4 cannot split over 16-way fsdp: said, not hidden.
  assert any(w.startswith("sft: batch_size 4 is not a multiple of data x fsdp = 16")
             for w in out["warnings"])


def test_full_fine_tuning_plan(capsys):
  out = _plan(capsys, "lora.enabled=false")
  state = {l["name"]: l for l in out["state"]}
  model = nnx.eval_shape(lambda: Llama(get_preset("llama3.2-1b", param_dtype="bfloat16"),
                                       rngs=nnx.Rngs(0)))
  params = nnx.state(model)
  assert out["trainable_params"] == out["num_params"] == _count(params) == 1_235_814_400
  per_device = shd.bytes_per_device(params, MESH)
  assert state["trainable parameters"]["per_device_bytes"] == per_device
  # AdamW: two moments sharded like the parameters (in the parameters' dtype) + a step counter
  assert 2 * per_device <= state["optimizer state (adamw)"]["per_device_bytes"] <= 2 * per_device + 64


@pytest.mark.parametrize("model, layers, d, q, kv, rank, total", [
    ("gemma2-2b", 26, 2304, 2048, 1024, 32, 2_614_341_888),
    ("gemma2-9b", 42, 3584, 4096, 2048, 8, 9_241_705_984)])
def test_gemma2_plans(capsys, model, layers, d, q, kv, rank, total):
  """The Gemma 2 recipes size before any checkpoint exists: the published parameter counts plus
  the LoRA adapters on q and v (rank 32 for 2B, 8 for 9B)."""
  config = os.path.join(ROOT, "configs", "experiments", "gender_real_uk", f"{model}.yaml")
  assert cli.main(["plan", config, "--devices", "16", "--no-compile", "--json"]) == 0
  out = json.loads(capsys.readouterr().out)
  adapters = layers * (d * rank + rank * q + d * rank + rank * kv)
  assert out["trainable_params"] == adapters
  assert out["num_params"] == total + adapters
  assert out["mesh"] == {"data": 1, "fsdp": 4, "tensor": 4}


def test_bad_input_exits_2(capsys):
  assert cli.main(["plan", CONFIG, "--devices", "16", "--mesh", "data=3,fsdp=4", "--no-compile"]) == 2
  assert "--mesh" in capsys.readouterr().err
  assert cli.main(["plan", CONFIG, "--devices", "4", "--stage", "warmup", "--no-compile"]) == 2
  assert cli.main(["plan", "nope.yaml", "--devices", "4"]) == 2
  assert cli.main(["plan", CONFIG, "lora.rnk=3", "--devices", "4", "--no-compile"]) == 2


@pytest.mark.slow
def test_compiled_step_on_simulated_devices(tmp_path):
  """A fresh `distfair plan` process gives itself 4 CPU devices and compiles the tiny SFT step."""
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  cmd = [sys.executable, "-m", "distfair_jax.cli", "plan",
         os.path.join(ROOT, "configs", "experiments", "tiny.yaml"), "model.overrides.num_hidden_layers=1",
         "data.max_length=32", "sft.batch_size=4", "--devices", "4", "--mesh", "data=2,fsdp=2",
         "--stage", "sft", "--json"]
  r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=300)
  assert r.returncode == 0, r.stderr
  out = json.loads(r.stdout)
  assert out["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
  (step,) = out["steps"]
  assert (step["stage"], step["batch_size"], step["length"]) == ("sft", 4, 32)
  state = {l["name"]: l for l in out["state"]}
  # The step's arguments hold (at least) this device's parameters and optimizer state ...
  held = state["parameters (all)"]["per_device_bytes"] + state["optimizer state (adamw)"]["per_device_bytes"]
  assert step["argument_bytes"] >= held
  # ... and the donated state comes back in place: outputs alias the params + optimizer state.
  assert step["alias_bytes"] >= held
  assert step["peak_bytes"] >= step["argument_bytes"]


@pytest.mark.slow
def test_compiled_packed_hybrid_step(tmp_path):
  """The hybrid stage compiles on the packed layout (one row per pair), sized for its worst case."""
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  cmd = [sys.executable, "-m", "distfair_jax.cli", "plan",
         os.path.join(ROOT, "configs", "experiments", "tiny.yaml"), "model.overrides.num_hidden_layers=1",
         "data.max_length=32", "data.max_prompt_length=16", "hybrid.batch_size=8", "--devices", "4",
         "--mesh", "data=2,fsdp=2", "--stage", "hybrid"]
  r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=300)
  assert r.returncode == 0, r.stderr
  assert "packed layout sized for its worst case: 4 rows x 128 tokens" in r.stdout, r.stdout
  # Pairs that do not split over data x fsdp: auto falls back to the rows layout.
  rows_cmd = [c if c != "data=2,fsdp=2" else "data=8" for c in cmd]
  rows_cmd[rows_cmd.index("--devices") + 1] = "8"
  r = subprocess.run(rows_cmd, capture_output=True, text=True, env=env, cwd=str(tmp_path),
                     timeout=300)
  assert r.returncode == 0, r.stderr
  assert re.search(r"^hybrid +8 x 32 ", r.stdout, re.M) and "packed layout" not in r.stdout, r.stdout
