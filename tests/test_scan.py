"""Scan over layers (``scan_layers``): the stacked model equals the per-layer loop.

- forward (padding and shared-prefix packing), gradients (with and without remat), prefill and
  decode, LoRA adapters (eval forward, dropout under the scan, merge);
- params on disk stay per layer: a stacked tree is unstacked when saved and restacked when
  loaded, so either layout reads every params directory;
- sharded on 8 devices: the ``layers`` axis is never split, the others as per layer;
- a training run with stacked layers on a (data, fsdp, tensor) mesh ends where the per-layer run
  on one device ends, and its export is the same.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from distfair_jax.model import checkpoint_io
from distfair_jax import sharding as shd
from distfair_jax.model import layout, lora
from distfair_jax.model.llama import Llama
from distfair_jax.model.presets import get_preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = get_preset("tiny", num_hidden_layers=3, vocab_size=256)


def _max_diff(a, b) -> float:
  return max(float(jnp.abs(jnp.asarray(x, jnp.float32) - jnp.asarray(y, jnp.float32)).max())
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _stacked_copy(loop: Llama, **changes) -> Llama:
  """A scan_layers model holding ``loop``'s weights (LoRA adapters included)."""
  cfg = loop.config.replace(scan_layers=True, **changes)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))))
  nnx.replace_by_pure_dict(state, layout.stack_layers(nnx.to_pure_dict(nnx.state(loop))))
  return nnx.merge(graphdef, state)


def _batch():
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(1, CFG.vocab_size, (3, 10)), jnp.int32)
  mask = jnp.ones_like(ids).at[1, :4].set(0).at[2, 7:].set(0)
  return ids, mask


@pytest.fixture(scope="module")
def models():
  loop = Llama(CFG, rngs=nnx.Rngs(0))
  return loop, _stacked_copy(loop)


def test_layout_round_trip_and_stacked_shapes(models):
  loop, scan = models
  per_layer = nnx.to_pure_dict(nnx.state(loop, nnx.Param))
  stacked = nnx.to_pure_dict(nnx.state(scan, nnx.Param))
  assert not layout.is_stacked(per_layer) and layout.is_stacked(stacked)
  assert layout.num_layers(per_layer) == layout.num_layers(stacked) == 3
  assert stacked["layers"]["mlp"]["up_proj"]["kernel"].shape == (3, 128, 512)
  assert _max_diff(layout.unstack_layers(stacked), per_layer) == 0
  assert scan.layers.self_attn.q_proj.kernel.get_metadata()["out_sharding"] == (
      "layers", "embed", "heads")
  fresh = Llama(CFG.replace(scan_layers=True), rngs=nnx.Rngs(0))  # built by nnx.vmap
  assert fresh.layers.mlp.down_proj.kernel.shape == (3, 512, 128)
  kernels = fresh.layers.mlp.down_proj.kernel[...]
  assert float(jnp.abs(kernels[0] - kernels[1]).max()) > 0  # each layer its own keys


def test_forward_padding_and_packing_equal_the_loop(models):
  loop, scan = models
  ids, mask = _batch()
  assert _max_diff(loop(ids, mask), scan(ids, mask)) <= 2e-6
  seg = jnp.asarray([[1, 1, 1, 2, 2, 3, 3, 3, 0, 0]] * 3)
  pos = jnp.asarray([[0, 1, 2, 3, 4, 3, 4, 5, 0, 0]] * 3)
  assert _max_diff(loop(ids, segment_ids=seg, positions=pos),
                   scan(ids, segment_ids=seg, positions=pos)) <= 2e-6


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_gradients_equal_the_loop(remat):
  loop = Llama(CFG.replace(remat=remat), rngs=nnx.Rngs(0))
  scan = _stacked_copy(loop)
  ids, mask = _batch()
  loss = lambda m: jnp.mean(m.logits(m(ids, mask)) ** 2)
  g_loop = nnx.to_pure_dict(nnx.grad(loss)(loop))
  g_scan = nnx.to_pure_dict(nnx.grad(loss)(scan))
  assert _max_diff(layout.stack_layers(g_loop), g_scan) <= 1e-7
  assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g_scan)) > 1e-4


def test_prefill_and_decode_equal_the_loop(models):
  loop, scan = models
  ids, mask = _batch()
  c_loop, c_scan = loop.init_cache(3, 16), scan.init_cache(3, 16)
  assert c_scan.k.shape == (3, 3, CFG.num_key_value_heads, 16, CFG.head_dim)
  assert c_scan.logical_axes().k == jax.sharding.PartitionSpec(
      "layers", "batch", "kv_heads", "cache_length", "head_dim")
  h_loop, c_loop = loop.prefill(ids, mask, c_loop)
  h_scan, c_scan = scan.prefill(ids, mask, c_scan)
  assert _max_diff(h_loop, h_scan) <= 2e-6
  for _ in range(3):
    tok = jnp.argmax(loop.logits(h_loop[:, -1:]), -1)
    h_loop, c_loop = loop.decode_step(tok, c_loop)
    h_scan, c_scan = scan.decode_step(tok, c_scan)
    assert _max_diff(h_loop, h_scan) <= 2e-6
  assert _max_diff(jnp.stack(c_loop.k), c_scan.k) <= 2e-6
  assert int(c_scan.index) == 13


def test_lora_on_stacked_layers(models):
  loop, _ = models
  loop = nnx.clone(loop)  # merge_lora below writes into the base kernels
  targets = ("q_proj", "v_proj", "down_proj")
  lora.apply_lora(loop, targets, rank=4, alpha=8.0, dropout=0.1)
  for layer in loop.layers:  # adapters away from their zero init
    b = layer.self_attn.q_proj.lora_b
    b[...] = 0.1 * jax.random.normal(jax.random.key(1), b.shape)
  scan = Llama(CFG.replace(scan_layers=True), rngs=nnx.Rngs(0))
  lora.apply_lora(scan, targets, rank=4, alpha=8.0, dropout=0.1)
  a = scan.layers.self_attn.q_proj.lora_a
  assert a.shape == (3, 128, 4) and a.get_metadata()["out_sharding"] == ("layers", "embed", None)
  state = nnx.state(scan)
  nnx.replace_by_pure_dict(state, layout.stack_layers(nnx.to_pure_dict(nnx.state(loop))))
  nnx.update(scan, state)
  ids, mask = _batch()
  loop.eval(), scan.eval()
  assert _max_diff(loop(ids, mask), scan(ids, mask)) <= 2e-6
  # Dropout under the scan: one stream per layer, advanced by each training forward.
  scan.train()
  graphdef, params, rngs, rest = nnx.split(scan, nnx.LoRAParam, nnx.RngState, ...)
  assert all(x.shape[0] == 3 for x in jax.tree.leaves(rngs))

  @jax.jit
  def forward(params, rngs, rest):
    model = nnx.merge(graphdef, params, rngs, rest)
    return model(ids, mask), nnx.state(model, nnx.RngState)

  out1, rngs1 = forward(params, rngs, rest)
  out2, _ = forward(params, rngs1, rest)
  assert float(jnp.abs(out1 - out2).max()) > 0
  merged_loop, merged_scan = lora.merge_lora(loop), lora.merge_lora(scan)
  merged_scan.eval()
  assert _max_diff(merged_loop(ids, mask), merged_scan(ids, mask)) <= 2e-6


def test_params_on_disk_are_per_layer(models, tmp_path):
  loop, scan = models
  checkpoint_io.save_params(tmp_path / "scan", nnx.state(scan, nnx.Param))
  checkpoint_io.save_params(tmp_path / "loop", nnx.state(loop, nnx.Param))
  meta = checkpoint_io.params_metadata(tmp_path / "scan")
  assert meta == checkpoint_io.params_metadata(tmp_path / "loop")
  assert ("layers", 2, "mlp", "up_proj", "kernel") in meta
  for src in ("scan", "loop"):  # either layout reads either directory
    into_scan = checkpoint_io.load_params(tmp_path / src, nnx.state(scan, nnx.Param))
    into_loop = checkpoint_io.load_params(tmp_path / src, nnx.state(loop, nnx.Param))
    assert _max_diff(into_scan, nnx.to_pure_dict(nnx.state(scan, nnx.Param))) == 0
    assert _max_diff(nnx.restore_int_paths(into_loop),
                     nnx.to_pure_dict(nnx.state(loop, nnx.Param))) == 0


def test_sharded_on_eight_devices(tmp_path):
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 (simulated) devices")
  mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  cfg = CFG.replace(scan_layers=True)
  model = shd.create_sharded(lambda: Llama(cfg, rngs=nnx.Rngs(0)), mesh)
  kernel = model.layers.self_attn.q_proj.kernel[...]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  assert kernel.addressable_shards[0].data.shape == (3, 64, 64)
  # Saved per layer from shards, restored onto the mesh stacked again.
  checkpoint_io.save_params(tmp_path / "p", nnx.state(model, nnx.Param))
  target = nnx.state(model, nnx.Param)
  back = checkpoint_io.load_params(tmp_path / "p", target,
                                   sharding=nnx.to_pure_dict(shd.state_shardings(target, mesh)))
  assert back["layers"]["self_attn"]["q_proj"]["kernel"].sharding.spec == kernel.sharding.spec
  assert _max_diff(back, nnx.to_pure_dict(target)) == 0
  ids, mask = _batch()
  with jax.set_mesh(mesh):
    out = jax.jit(lambda m, i, a: m(i, a))(model, ids, mask)
  loop = Llama(CFG, rngs=nnx.Rngs(0))
  nnx.update(loop, nnx.State(nnx.restore_int_paths(layout.unstack_layers(
      jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))))))
  # Sharded over tensor and fsdp the matmuls sum in other orders than on one device: float32
  # rounding of O(1) logits (2.1e-6 on an AVX-512 Xeon, under 2e-6 on an EPYC), not a layout error,
  # which would be O(1).
  assert _max_diff(out, loop(ids, mask)) <= 1e-5


EXPERIMENT = """\
defaults: [{base}]
stages: [sft, hybrid]
model:
  params: {params}
  overrides: {{num_hidden_layers: 3, hidden_size: 64, intermediate_size: 128, num_attention_heads: 4,
              num_key_value_heads: 2, head_dim: 16}}
data: {{rows_per_occupation: 8, max_length: 64, max_prompt_length: 48}}
sft: {{epochs: 1, batch_size: 8, max_steps: 4, optim: {{learning_rate: 1.0e-3, warmup_steps: 1}}}}
hybrid: {{epochs: 1, batch_size: 8, max_steps: 3, optim: {{learning_rate: 1.0e-3, warmup_steps: 1}}}}
checkpoint: {{every_steps: 0}}
heldout: {{max_batches: 1}}
logging: {{tensorboard: false, progress: false}}
"""


def _distfair(cwd, *args, devices: int = 1):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  proc = subprocess.run([sys.executable, "-m", "distfair_jax.cli", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, f"distfair {' '.join(args)}:\n{proc.stderr[-3000:]}"
  return proc


@pytest.mark.slow
def test_a_scanned_training_run_equals_the_loop(tmp_path):
  """Same initial weights (model.params, per layer on disk), both stages: the stacked model on a
  2 x 2 x 2 mesh against the loop on one device."""
  from safetensors.numpy import load_file
  cfg = get_preset("tiny", num_hidden_layers=3, hidden_size=64, intermediate_size=128,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16)
  checkpoint_io.save_params(tmp_path / "init", nnx.state(Llama(cfg, rngs=nnx.Rngs(3)), nnx.Param))
  (tmp_path / "exp.yaml").write_text(EXPERIMENT.format(
      base=os.path.join(ROOT, "configs", "base.yaml"), params=tmp_path / "init"))
  _distfair(tmp_path, "train", "exp.yaml", "run_dir=loop")
  _distfair(tmp_path, "train", "exp.yaml", "run_dir=scan", "model.scan_layers=true",
            "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", devices=8)
  rows = lambda run: [json.loads(l) for l in (tmp_path / run / "metrics.jsonl").read_text()
                      .splitlines() if json.loads(l)["split"] == "train"]
  a, b = rows("loop"), rows("scan")
  assert [(r["stage"], r["step"]) for r in a] == [(r["stage"], r["step"]) for r in b]
  for x, y in zip(a, b):
    assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-6), (x, y)
  for run in ("loop", "scan"):
    _distfair(tmp_path, "export", run, f"hf-{run}")
  w_loop, w_scan = load_file(tmp_path / "hf-loop" / "model.safetensors"), load_file(
      tmp_path / "hf-scan" / "model.safetensors")
  assert sorted(w_loop) == sorted(w_scan)
  assert max(float(np.abs(w_loop[k] - w_scan[k]).max()) for k in w_loop) <= 1e-5
