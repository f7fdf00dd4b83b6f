"""Tests for distfair_jax.sharding on 8 simulated CPU devices (a 2 x 2 x 2 data/fsdp/tensor mesh)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from distfair_jax import sharding as shd
from distfair_jax.errors import InputError
from distfair_jax.model import Llama, LlamaConfig

CFG = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  attention_bias=True, tie_word_embeddings=False)
IDS = np.array([[0, 0, 5, 17, 9, 33], [7, 8, 9, 10, 0, 0], [3, 1, 4, 1, 5, 9], [0, 2, 7, 1, 8, 2],
                [1, 2, 3, 4, 5, 6], [0, 0, 0, 9, 9, 9], [6, 5, 4, 3, 2, 0], [11, 12, 13, 14, 15, 16]],
               np.int32)
MASK = (IDS != 0).astype(np.int32)


@pytest.fixture(scope="module")
def mesh():
  assert len(jax.devices()) == 8
  return shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


# ------------------------------------------------------------------------------------------------
# Mesh
# ------------------------------------------------------------------------------------------------


def test_make_mesh_fills_minus_one():
  m = shd.make_mesh({"data": -1, "fsdp": 1, "tensor": 2})
  assert dict(m.shape) == {"data": 4, "fsdp": 1, "tensor": 2}
  assert dict(shd.make_mesh().shape) == {"data": 8, "fsdp": 1, "tensor": 1}
  assert dict(shd.make_mesh({"fsdp": -1}, devices=jax.devices()[:4]).shape) == {
      "data": 1, "fsdp": 4, "tensor": 1}


@pytest.mark.parametrize("axes, message", [
    ({"data": 3, "fsdp": 1, "tensor": 1}, r"expected a product equal to the number of devices "
                                          r"\(8\), got 3"),
    ({"data": -1, "fsdp": 3}, r"expected the other axes' product \(3\) to divide"),
    ({"data": -1, "fsdp": -1}, "at most one axis of size -1"),
    ({"data": -1, "fdsp": 2}, "fdsp: expected one of data, fsdp, tensor"),
    ({"data": 0}, "data: expected a positive integer or -1, got 0"),
])
def test_make_mesh_errors(axes, message):
  with pytest.raises(InputError, match=message):
    shd.make_mesh(axes)


# ------------------------------------------------------------------------------------------------
# Rules
# ------------------------------------------------------------------------------------------------


def test_logical_to_spec_rules_and_fallbacks():
  sizes = {"data": 2, "fsdp": 2, "tensor": 2}
  assert shd.logical_to_spec(("embed", "heads"), (64, 64), sizes) == P("fsdp", "tensor")
  assert shd.logical_to_spec(("vocab", "embed"), (128, 64), sizes) == P("tensor", "fsdp")
  assert shd.logical_to_spec(("norm",), (64,), sizes) == P()
  assert shd.logical_to_spec(("batch", "length"), (8, 6), sizes) == P(("data", "fsdp"))
  # Batch of 2 cannot split 4 ways: keeps the axes that divide.
  assert shd.logical_to_spec(("batch", "length"), (2, 6), sizes) == P("data")
  # Not divisible -> replicated on that dimension; size-1 axes are dropped.
  assert shd.logical_to_spec(("embed", "kv_heads"), (64, 3), sizes) == P("fsdp")
  assert shd.logical_to_spec(("embed", "heads"), (64, 64), {"data": 8, "fsdp": 1}) == P()
  # A mesh axis is used at most once per array.
  rules = shd.LOGICAL_RULES + (("other", "fsdp"),)
  assert shd.logical_to_spec(("embed", "other"), (4, 4), sizes, rules) == P("fsdp")


# ------------------------------------------------------------------------------------------------
# Sharded model
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def single_device_logits():
  model = Llama(CFG, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)

  @jax.jit
  def fwd(state, ids, mask):
    m = nnx.merge(graphdef, state)
    return m.logits(m(ids, mask))

  return graphdef, state, np.asarray(fwd(state, IDS, MASK))


def test_sharded_forward_equals_single_device(mesh, single_device_logits):
  graphdef, state, expected = single_device_logits
  sharded = shd.shard_state(state, mesh)
  q = sharded["layers"][0]["self_attn"]["q_proj"]["kernel"][...]
  assert q.sharding.spec == P("fsdp", "tensor")
  assert sharded["layers"][0]["self_attn"]["k_proj"]["bias"][...].sharding.spec == P("tensor")
  assert sharded["layers"][0]["self_attn"]["o_proj"]["kernel"][...].sharding.spec == P(
      "tensor", "fsdp")
  assert sharded["embed_tokens"]["embedding"][...].sharding.spec == P("tensor", "fsdp")
  assert sharded["lm_head"]["kernel"][...].sharding.spec == P("fsdp", "tensor")
  assert sharded["layers"][1]["mlp"]["down_proj"]["kernel"][...].sharding.spec == P(
      "tensor", "fsdp")
  # Each device holds a quarter of q_proj: really split, not replicated.
  assert q.addressable_shards[0].data.shape == (32, 32)
  assert shd.replicated_fraction(sharded) < 0.02
  assert shd.replicated_fraction(state) == 1.0

  batch = shd.put_batch({"input_ids": IDS, "attention_mask": MASK}, mesh)
  assert batch["input_ids"].sharding.spec == P(("data", "fsdp"))
  shardings = shd.state_shardings(state, mesh)

  @jax.jit
  def fwd(state, ids, mask):
    m = nnx.merge(graphdef, state)
    return m.logits(m(ids, mask))

  with jax.set_mesh(mesh):
    logits = fwd(sharded, batch["input_ids"], batch["attention_mask"])
    lowered = jax.jit(fwd, in_shardings=(shardings, None, None)).lower(
        sharded, batch["input_ids"], batch["attention_mask"]).as_text()
  assert "sharding_constraint" in lowered  # activations are constrained by logical names
  np.testing.assert_allclose(np.asarray(logits), expected, atol=2e-5)


def test_create_sharded_and_abstract_shardings(mesh):
  model = shd.create_sharded(lambda: Llama(CFG, rngs=nnx.Rngs(0)), mesh)
  state = nnx.state(model)
  assert state["embed_tokens"]["embedding"][...].sharding.spec == P("tensor", "fsdp")
  assert shd.replicated_fraction(state) < 0.02
  abstract = nnx.state(nnx.eval_shape(lambda: Llama(CFG, rngs=nnx.Rngs(0))))
  shardings = shd.state_shardings(abstract, mesh)
  assert shardings["layers"][0]["self_attn"]["v_proj"]["kernel"].value.spec == P("fsdp", "tensor")
  # bytes_per_device needs no devices: sizes are enough.
  per_dev = shd.bytes_per_device(abstract, {"fsdp": 2, "tensor": 2, "data": 2})
  total = sum(x.size * 4 for x in jax.tree.leaves(abstract))
  assert total / 4 <= per_dev < total / 3.5


def test_sharded_kv_cache_prefill(mesh, single_device_logits):
  graphdef, state, expected = single_device_logits
  sharded = shd.shard_state(state, mesh)
  model = nnx.merge(graphdef, sharded)
  cache = model.init_cache(IDS.shape[0], IDS.shape[1] + 2)
  cache_sh = shd.logical_shardings(cache.logical_axes(), mesh, cache)
  assert cache_sh.k[0].spec == P(("data", "fsdp"), "tensor")  # [B, kv_heads, S, head_dim]
  cache = jax.device_put(cache, cache_sh)

  @jax.jit
  def prefill(state, ids, mask, cache):
    m = nnx.merge(graphdef, state)
    h, cache = m.prefill(ids, mask, cache)
    return m.logits(h), cache

  with jax.set_mesh(mesh):
    logits, cache = prefill(sharded, IDS, MASK, cache)
  real = MASK.astype(bool)
  np.testing.assert_allclose(np.asarray(logits)[real], expected[real], atol=2e-5)
  assert int(cache.index) == IDS.shape[1]


def test_put_batch_rejects_indivisible_batch(mesh):
  with pytest.raises(InputError, match=r"batch_size: expected a multiple of data\*fsdp \(4\)"):
    shd.put_batch({"input_ids": IDS[:3]}, mesh)
