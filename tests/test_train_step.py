"""The jitted train steps on a small random model and synthetic batches (no tokenizer needed).

- the hybrid step on 2x2x2 and 8x1x1 meshes equals the single-device step (loss and updated params);
- every ablation and the cached reference give finite losses, and cached equals online;
- a hybrid batch of one is refused with the reason.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from distfair_jax import sharding as shd
from distfair_jax.config import OptimConfig
from distfair_jax.model.llama import Llama, LlamaConfig
from distfair_jax.train.state import init_train_state, make_optimizer, split_model
from distfair_jax.train.step import (StepSpec, check_batch, make_loss_fn, make_reference_fn,
                                     make_train_step)

CFG = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  max_position_embeddings=64, tie_word_embeddings=False)
STEERING = jnp.array([3, 4], jnp.int32)
B, L = 8, 12


def hybrid_batch(seed=0):
  """Rows 0..3 desirable, 4..7 their undesirable pairs; mismatched pairs rotate completions."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, CFG.vocab_size, size=(B, L)).astype(np.int32)
  plen = rng.integers(3, 6, size=B)
  total = np.minimum(plen + rng.integers(3, 6, size=B), L)
  mask = (np.arange(L)[None] < total[:, None]).astype(np.int32)
  steer = plen - 1
  ids[np.arange(B), plen] = np.array([3, 4, 3, 4, 3, 4, 3, 4])
  labels = np.concatenate([ids[:, 1:], np.zeros((B, 1), np.int32)], 1)
  lmask = ((np.arange(L)[None] >= steer[:, None]) & (np.arange(L)[None] < total[:, None] - 1))
  kl_ids = np.roll(ids, 1, axis=0)
  batch = dict(input_ids=ids, attention_mask=mask, labels=labels, label_mask=lmask.astype(np.float32),
               steering_position=steer.astype(np.int32), category=(ids[np.arange(B), plen] - 3),
               desirable=np.array([1, 1, 1, 1, 0, 0, 0, 0], np.int32),
               target=np.tile(np.array([[0.8, 0.2]], np.float32), (B, 1)),
               kl_input_ids=kl_ids, kl_attention_mask=np.roll(mask, 1, 0),
               kl_labels=np.roll(labels, 1, 0), kl_label_mask=np.roll(lmask, 1, 0).astype(np.float32))
  return {k: np.asarray(v) for k, v in batch.items()}


def run_hybrid(mesh_axes, spec=StepSpec(kind="hybrid", tile_size=5), steps=2):
  """Two hybrid steps on ``mesh_axes``; -> (losses, final params as numpy, param shardings)."""
  mesh = shd.make_mesh(mesh_axes, devices=jax.devices()[:int(np.prod(list(mesh_axes.values())))])
  model = shd.create_sharded(lambda: Llama(CFG, rngs=nnx.Rngs(0)), mesh)
  graphdef, params, rngs, frozen = split_model(model, lora=False)
  model.eval()
  graphdef_eval = split_model(model, lora=False)[0]
  tx, schedule = make_optimizer(OptimConfig(learning_rate=1e-2, warmup_steps=0), 10)
  ref = jax.tree.map(jnp.copy, params)
  state = init_train_state(tx, params, rngs, mesh)
  step = jax.jit(make_train_step(make_loss_fn(graphdef, graphdef_eval, spec, STEERING), tx, schedule),
                 donate_argnums=(0,), out_shardings=(jax.tree.map(lambda x: x.sharding, state), None))
  losses = []
  ref_fn = jax.jit(make_reference_fn(graphdef_eval, spec))
  for i in range(steps):
    batch = hybrid_batch(i)
    if spec.reference == "cached":
      batch.update(jax.device_get(ref_fn(ref, rngs, frozen, shd.put_batch(batch, mesh))))
    state, metrics = step(state, frozen, ref if spec.reference == "online" else None,
                          shd.put_batch(batch, mesh))
    losses.append(float(metrics["loss"]))
  return losses, jax.device_get(nnx.to_pure_dict(state.params)), state.params, metrics


@pytest.fixture(scope="module")
def single():
  return run_hybrid({"data": 1, "fsdp": 1, "tensor": 1})


@pytest.mark.slow
@pytest.mark.parametrize("axes", [{"data": 2, "fsdp": 2, "tensor": 2}, {"data": 8, "fsdp": 1, "tensor": 1}])
def test_sharded_hybrid_step_equals_single_device(single, axes):
  losses, params, sharded_params, _ = run_hybrid(axes)
  np.testing.assert_allclose(losses, single[0], rtol=2e-5, atol=2e-6)
  flat1 = jax.tree.leaves(single[1])
  flat2 = jax.tree.leaves(params)
  assert len(flat1) == len(flat2)
  for a, b in zip(flat1, flat2):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
  if axes["fsdp"] > 1:  # parameters really are split, not replicated
    assert shd.replicated_fraction(sharded_params) < 0.1


def test_hybrid_metrics_are_finite_and_named(single):
  metrics = single[3]
  for name in ("loss", "kl", "steering_kl", "rewards/chosen", "rewards/rejected", "rewards/margins",
               "logps/chosen", "logps/rejected", "grad_norm", "learning_rate"):
    assert name in metrics and np.isfinite(float(metrics[name])), name


@pytest.mark.slow
def test_cached_reference_equals_online(single):
  losses, params, _, _ = run_hybrid({"data": 1, "fsdp": 1, "tensor": 1},
                                    StepSpec(kind="hybrid", tile_size=5, reference="cached"))
  np.testing.assert_allclose(losses, single[0], rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(single[1]), jax.tree.leaves(params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("ablation", ["kl_only", "kto_only"])
def test_ablations_run(single, ablation):
  losses, _, _, metrics = run_hybrid({"data": 1, "fsdp": 1, "tensor": 1},
                                     StepSpec(kind="hybrid", tile_size=5, ablation=ablation), steps=1)
  assert np.isfinite(losses[0])
  # kl_only trains on the steering KL alone, kto_only on the KTO loss alone.
  expected = metrics["steering_kl"] if ablation == "kl_only" else metrics["kto_loss"]
  np.testing.assert_allclose(losses[0], float(expected), rtol=1e-6)


def test_batch_of_one_is_refused():
  batch = {k: v[:1] for k, v in hybrid_batch().items()}
  with pytest.raises(ValueError, match="mismatched pairs"):
    check_batch(StepSpec(kind="hybrid"), batch)


@pytest.mark.slow
def test_lora_with_dropout_and_remat_trains_only_adapters():
  """The paper's setting (LoRA on q/v with dropout) under remat: compiles, runs, moves only adapters,
  and dropout draws fresh masks each step (the RNG state advances)."""
  from distfair_jax.model.lora import apply_lora
  cfg = CFG.replace(remat="full")
  model = apply_lora(Llama(cfg, rngs=nnx.Rngs(0)), ("q_proj", "v_proj"), rank=4, alpha=8,
                     dropout=0.1, seed=0)
  graphdef, params, rngs, frozen = split_model(model, lora=True)
  model.eval()
  graphdef_eval = split_model(model, lora=True)[0]
  tx, schedule = make_optimizer(OptimConfig(learning_rate=1e-2, warmup_steps=0), 10)
  mesh = shd.make_mesh({"data": 1}, devices=jax.devices()[:1])
  state = init_train_state(tx, params, rngs, mesh)
  spec = StepSpec(kind="hybrid", tile_size=5)
  step = jax.jit(make_train_step(make_loss_fn(graphdef, graphdef_eval, spec, STEERING), tx, schedule))
  frozen_before = [np.array(x) for x in jax.tree.leaves(frozen)]
  as_np = lambda x: np.array(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
                             else x)
  rng_before = [as_np(x) for x in jax.tree.leaves(state.rngs)]
  params_before = [np.array(x) for x in jax.tree.leaves(state.params)]
  for i in range(2):
    state, metrics = step(state, frozen, params, hybrid_batch(i))
    assert np.isfinite(float(metrics["loss"]))
  assert any(not np.array_equal(a, as_np(b)) for a, b in zip(rng_before, jax.tree.leaves(state.rngs)))
  assert any(not np.array_equal(a, np.array(b)) for a, b in zip(params_before,
                                                                jax.tree.leaves(state.params)))
  for a, b in zip(frozen_before, jax.tree.leaves(frozen)):
    np.testing.assert_array_equal(a, np.array(b))


@pytest.fixture(scope="module")
def tokenized_kto():
  """4 real KTO pairs (gender, tiny tokenizer) in both layouts, and the steering ids."""
  from distfair_jax.data import attributes, build, tokenize
  from distfair_jax.tokenizer import build_tiny_tokenizer
  tok = build_tiny_tokenizer()
  recs = build.build_dataset("gender_real_us", rows_per_occupation=4, test_rounds=1)["kto"][:8]
  enc = tokenize.Encoder(tok, attribute=attributes.GENDER)
  return (tokenize.tokenize_batch(recs, tok, "kto", encoder=enc),
          tokenize.tokenize_batch(recs, tok, "kto", encoder=enc, layout="packed"),
          jnp.asarray(enc.steering_ids), len(tok))


@pytest.mark.slow
@pytest.mark.parametrize("reference", ["online", "cached"])
def test_packed_layout_equals_rows(tokenized_kto, reference):
  """The packed step (one pass per pair; here on a data 2 x fsdp 2 mesh) gives the rows layout's
  loss, metrics and gradients (dropout off: packed runs the mismatched branches in train mode)."""
  rows, packed, steering, vocab = tokenized_kto
  cfg = CFG.replace(vocab_size=vocab, max_position_embeddings=256)
  spec = StepSpec(kind="hybrid", tile_size=16, reference=reference)

  def loss_and_grads(batch, axes):
    mesh = shd.make_mesh(axes, devices=jax.devices()[:int(np.prod(list(axes.values())))])
    model = shd.create_sharded(lambda: Llama(cfg, rngs=nnx.Rngs(0)), mesh)
    graphdef, params, rngs, frozen = split_model(model, lora=False)
    model.eval()
    graphdef_eval = split_model(model, lora=False)[0]
    ref = jax.tree.map(lambda x: x * 0.9, params)  # a reference that differs from the policy
    batch = shd.put_batch(batch, mesh)
    if reference == "cached":
      batch = dict(batch, **jax.jit(make_reference_fn(graphdef_eval, spec))(ref, rngs, frozen, batch))
      ref = None
    fn = jax.jit(jax.value_and_grad(make_loss_fn(graphdef, graphdef_eval, spec, steering),
                                    has_aux=True))
    (loss, (metrics, _)), grads = fn(params, rngs, frozen, ref, batch)
    return jax.device_get((loss, metrics, nnx.to_pure_dict(grads)))

  loss_r, metrics_r, grads_r = loss_and_grads(rows, {"data": 1, "fsdp": 1, "tensor": 1})
  loss_p, metrics_p, grads_p = loss_and_grads(packed, {"data": 2, "fsdp": 2, "tensor": 1})
  np.testing.assert_allclose(loss_p, loss_r, rtol=1e-5)
  assert set(metrics_p) == set(metrics_r)
  for k in metrics_r:
    np.testing.assert_allclose(metrics_p[k], metrics_r[k], rtol=1e-4, atol=1e-6, err_msg=k)
  for a, b in zip(jax.tree.leaves(grads_r), jax.tree.leaves(grads_p)):
    np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-6 * float(np.abs(a).max()) + 1e-9)


def test_packed_batch_missing_key_is_refused(tokenized_kto):
  packed = dict(tokenized_kto[1])
  packed.pop("label_source")
  with pytest.raises(ValueError, match="label_source"):
    check_batch(StepSpec(kind="hybrid"), packed)


def test_packed_step_flops_count_the_shared_prompt_once():
  """FLOPs of a packed batch: the transformer over the packed tokens (3x policy + 1x reference), the
  output projection over the labels only; fewer than the rows layout of the same sequences."""
  from distfair_jax.train.flops import forward_flops_per_token, step_flops
  head = 2.0 * CFG.hidden_size * CFG.vocab_size
  packed = {"packed": (4, 64), "labels": (8, 16)}
  body = 4 * 64 * (forward_flops_per_token(CFG, 64) - head)
  labels = 8 * 16 * head
  # policy: targets 3x, mismatched 1x (half the labels each); reference: every label once
  assert step_flops(CFG, "hybrid", packed) == pytest.approx(4 * body + 3 * labels / 2 + labels / 2 + labels)
  assert step_flops(CFG, "hybrid", packed, "cached") == pytest.approx(3 * body + 2 * labels)
  rows = {"target": (8, 64), "kl": (8, 64)}
  assert step_flops(CFG, "hybrid", rows) == pytest.approx(6 * 8 * 64 * forward_flops_per_token(CFG, 64))
  assert step_flops(CFG, "hybrid", packed) < 0.5 * step_flops(CFG, "hybrid", rows)


@pytest.mark.slow
def test_packed_dpo_equals_rows():
  """DPO on [prompt | chosen | rejected] rows gives the rows layout's loss, metrics and gradients."""
  from distfair_jax.data import build, tokenize
  from distfair_jax.tokenizer import build_tiny_tokenizer
  tok = build_tiny_tokenizer()
  recs = build.build_dataset("gender_real_us", rows_per_occupation=4, test_rounds=1)["dpo"][:4]
  rows = tokenize.tokenize_batch(recs, tok, "dpo")
  packed = tokenize.tokenize_batch(recs, tok, "dpo", layout="packed")
  assert packed["packed_input_ids"].shape[0] == 4 and packed["label_ids"].shape[1] == 1
  check_batch(StepSpec(kind="dpo"), packed)
  cfg = CFG.replace(vocab_size=len(tok), max_position_embeddings=256)
  model = Llama(cfg, rngs=nnx.Rngs(0))
  graphdef, params, rngs, frozen = split_model(model, lora=False)
  model.eval()
  graphdef_eval = split_model(model, lora=False)[0]
  ref = jax.tree.map(lambda x: x * 0.9, params)
  fn = jax.value_and_grad(make_loss_fn(graphdef, graphdef_eval, StepSpec(kind="dpo", tile_size=16),
                                       None), has_aux=True)
  out = [jax.device_get(fn(params, rngs, frozen, ref, {k: jnp.asarray(v) for k, v in b.items()}))
         for b in (rows, packed)]
  (loss_r, (metrics_r, _)), grads_r = out[0]
  (loss_p, (metrics_p, _)), grads_p = out[1]
  np.testing.assert_allclose(loss_p, loss_r, rtol=1e-5)
  for k in metrics_r:
    np.testing.assert_allclose(metrics_p[k], metrics_r[k], rtol=1e-4, atol=1e-6, err_msg=k)
  for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(grads_r)), jax.tree.leaves(nnx.to_pure_dict(grads_p))):
    np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-6 * float(np.abs(a).max()) + 1e-9)
