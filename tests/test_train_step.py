"""The jitted train steps on a small random model and synthetic batches (no tokenizer needed).

- the hybrid step on 2x2x2 and 8x1x1 meshes equals the single-device step (loss, gradients, and
  parameters after SGD steps: what sharding can change, at tolerances of reduction order);
- every ablation and the cached reference give finite losses, and cached equals online;
- a hybrid batch of one, and a batch of the wrong layout, are refused with the reason.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from distfair_jax import sharding as shd
from distfair_jax.config import DPOConfig, HybridConfig, OptimConfig
from distfair_jax.data import batches as B
from distfair_jax.errors import InputError
from distfair_jax.model.llama import Llama, LlamaConfig
from distfair_jax.model.loader import split_model
from distfair_jax.train.stages import DPOStage, HybridStage, SFTStage
from distfair_jax.train.state import init_train_state, make_optimizer
from distfair_jax.train.step import make_train_step

CFG = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  max_position_embeddings=64, tie_word_embeddings=False)
STEERING = jnp.array([3, 4], jnp.int32)
B_, L = 8, 12
HYBRID = HybridStage(HybridConfig(), tile_size=5)
# SGD: an update is the gradient times the rate, so parameters differ only as much as gradients
# (Adam's normalisation would magnify reduction-order noise where a gradient is near zero).
SGD = OptimConfig(optimizer="sgd", b1=0.0, learning_rate=1e-2, warmup_steps=0, weight_decay=0.0)


def hybrid_batch(seed=0) -> B.HybridBatch:
  """Rows 0..3 desirable, 4..7 their undesirable pairs; mismatched pairs rotate completions."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, CFG.vocab_size, size=(B_, L)).astype(np.int32)
  plen = rng.integers(3, 6, size=B_)
  total = np.minimum(plen + rng.integers(3, 6, size=B_), L)
  mask = (np.arange(L)[None] < total[:, None]).astype(np.int32)
  steer = plen - 1
  ids[np.arange(B_), plen] = np.array([3, 4, 3, 4, 3, 4, 3, 4])
  labels = np.concatenate([ids[:, 1:], np.zeros((B_, 1), np.int32)], 1)
  lmask = ((np.arange(L)[None] >= steer[:, None]) &
           (np.arange(L)[None] < total[:, None] - 1)).astype(np.float32)
  seq = B.Sequences(ids, mask, labels, lmask)
  mismatched = jax.tree.map(lambda x: np.roll(x, 1, axis=0), seq)
  return B.HybridBatch(seq, mismatched, steer.astype(np.int32),
                       (ids[np.arange(B_), plen] - 3).astype(np.int32),
                       np.tile(np.array([[0.8, 0.2]], np.float32), (B_, 1)),
                       np.array([1, 1, 1, 1, 0, 0, 0, 0], np.int32))


def _model(mesh, cfg=CFG, lora=False):
  model = shd.create_sharded(lambda: Llama(cfg, rngs=nnx.Rngs(0)), mesh)
  return split_model(model, lora)


def _mesh(axes):
  return shd.make_mesh(axes, devices=jax.devices()[:int(np.prod(list(axes.values())))])


def run_hybrid(mesh_axes, stage=HYBRID, steps=2, optim=SGD):
  """``steps`` hybrid steps on ``mesh_axes``; -> (losses, final params as numpy, params, last
  metrics, first-step gradients as numpy)."""
  mesh = _mesh(mesh_axes)
  graphdef, graphdef_eval, params, rngs, frozen = _model(mesh)
  tx, schedule = make_optimizer(optim, 10)
  ref = jax.tree.map(jnp.copy, params)
  state = init_train_state(tx, params, rngs, mesh)
  loss_fn = stage.loss_fn(graphdef, graphdef_eval, STEERING)
  step = jax.jit(make_train_step(loss_fn, tx, schedule), donate_argnums=(0,),
                 out_shardings=(jax.tree.map(lambda x: x.sharding, state), None))
  grad = jax.jit(jax.grad(lambda *a: loss_fn(*a)[0]))
  ref_fn = jax.jit(stage.reference_fn(graphdef_eval))
  losses, grads = [], None
  for i in range(steps):
    batch = shd.put_batch(hybrid_batch(i), mesh)
    if stage.caches_reference:
      batch = batch.replace(reference=ref_fn(ref, rngs, frozen, batch))
    online = ref if stage.needs_reference else None
    if i == 0:
      grads = jax.device_get(nnx.to_pure_dict(grad(state.params, state.rngs, frozen, online, batch)))
    state, metrics = step(state, frozen, online, batch)
    losses.append(float(metrics["loss"]))
  return losses, jax.device_get(nnx.to_pure_dict(state.params)), state.params, metrics, grads


@pytest.fixture(scope="module")
def single():
  return run_hybrid({"data": 1, "fsdp": 1, "tensor": 1})


def _close_tree(a, b, rtol, scale_atol):
  """Leafwise close: relative ``rtol``, absolute ``scale_atol`` times the leaf's largest value."""
  flat_a, flat_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(flat_a) == len(flat_b)
  for x, y in zip(flat_a, flat_b):
    np.testing.assert_allclose(y, x, rtol=rtol, atol=scale_atol * float(np.abs(x).max()) + 1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("axes", [{"data": 2, "fsdp": 2, "tensor": 2}, {"data": 8, "fsdp": 1, "tensor": 1}])
def test_sharded_hybrid_step_equals_single_device(single, axes):
  losses, params, sharded_params, _, grads = run_hybrid(axes)
  np.testing.assert_allclose(losses, single[0], rtol=2e-5, atol=2e-6)
  _close_tree(single[4], grads, rtol=1e-3, scale_atol=1e-5)  # the first step's gradients
  _close_tree(single[1], params, rtol=1e-5, scale_atol=1e-6)  # parameters after two SGD steps
  if axes["fsdp"] > 1:  # parameters really are split, not replicated
    assert shd.replicated_fraction(sharded_params) < 0.1


def test_hybrid_metrics_are_finite_and_named(single):
  metrics = single[3]
  for name in ("loss", "kl", "steering_kl", "rewards/chosen", "rewards/rejected", "rewards/margins",
               "logps/chosen", "logps/rejected", "grad_norm", "learning_rate"):
    assert name in metrics and np.isfinite(float(metrics[name])), name


@pytest.mark.slow
def test_cached_reference_equals_online(single):
  cached = dataclasses.replace(HYBRID, cfg=dataclasses.replace(HYBRID.cfg, reference="cached"))
  losses, params, _, _, grads = run_hybrid({"data": 1, "fsdp": 1, "tensor": 1}, cached)
  np.testing.assert_allclose(losses, single[0], rtol=1e-5, atol=1e-6)
  _close_tree(single[4], grads, rtol=1e-4, scale_atol=1e-6)
  _close_tree(single[1], params, rtol=1e-5, scale_atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("ablation", ["kl_only", "kto_only"])
def test_ablations_run(single, ablation):
  stage = dataclasses.replace(HYBRID, cfg=dataclasses.replace(HYBRID.cfg, ablation=ablation))
  losses, _, _, metrics, _ = run_hybrid({"data": 1, "fsdp": 1, "tensor": 1}, stage, steps=1)
  assert np.isfinite(losses[0])
  # kl_only trains on the steering KL alone, kto_only on the KTO loss alone.
  expected = metrics["steering_kl"] if ablation == "kl_only" else metrics["kto_loss"]
  np.testing.assert_allclose(losses[0], float(expected), rtol=1e-6)
  # kl_only reads no reference model: no reference pass in the step, no pooled cache before it
  for mode in ("online", "cached", "auto"):
    s = dataclasses.replace(stage, cfg=dataclasses.replace(stage.cfg, reference=mode))
    assert (s.needs_reference or s.caches_reference) is (ablation == "kto_only"), mode
  assert ("rewards/chosen" in metrics) is (ablation == "kto_only")


def test_batch_of_one_and_wrong_layout_are_refused():
  one = jax.tree.map(lambda v: v[:1], hybrid_batch())
  with pytest.raises(InputError, match="mismatched pairs"):
    HYBRID.check_batch(one)
  sft = B.SFTBatch(one.seq, one.steering_position, one.category, one.target)
  with pytest.raises(InputError, match="expected one of HybridBatch, PackedHybridBatch, got SFTBatch"):
    HYBRID.check_batch(sft)
  SFTStage().check_batch(sft)  # an SFT batch is what the SFT step takes


@pytest.mark.slow
def test_lora_with_dropout_and_remat_trains_only_adapters():
  """The paper's setting (LoRA on q/v with dropout) under remat: compiles, runs, moves only adapters,
  and dropout draws fresh masks each step (the RNG state advances)."""
  from distfair_jax.model.lora import apply_lora
  cfg = CFG.replace(remat="full")
  model = apply_lora(Llama(cfg, rngs=nnx.Rngs(0)), ("q_proj", "v_proj"), rank=4, alpha=8,
                     dropout=0.1, seed=0)
  graphdef, graphdef_eval, params, rngs, frozen = split_model(model, lora=True)
  tx, schedule = make_optimizer(OptimConfig(learning_rate=1e-2, warmup_steps=0), 10)
  mesh = shd.make_mesh({"data": 1}, devices=jax.devices()[:1])
  state = init_train_state(tx, params, rngs, mesh)
  step = jax.jit(make_train_step(HYBRID.loss_fn(graphdef, graphdef_eval, STEERING), tx, schedule))
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
  from distfair_jax.data import attributes, build, collate, tokenize
  from distfair_jax.data.tokenizer import build_tiny_tokenizer
  tok = build_tiny_tokenizer()
  recs = build.build_dataset("gender_real_us", rows_per_occupation=4, test_rounds=1)["kto"][:8]
  enc = tokenize.Encoder(tok, attribute=attributes.GENDER)
  return (collate.tokenize_batch(recs, tok, "kto", encoder=enc),
          collate.tokenize_batch(recs, tok, "kto", encoder=enc, layout="packed"),
          jnp.asarray(enc.steering_ids), len(tok))


@pytest.mark.slow
@pytest.mark.parametrize("reference", ["online", "cached"])
def test_packed_layout_equals_rows(tokenized_kto, reference):
  """The packed step (one pass per pair; here on a data 2 x fsdp 2 mesh) gives the rows layout's
  loss, metrics and gradients (dropout off: packed runs the mismatched branches in train mode);
  with the cached reference, the desirable completions' NLL term too (its token counts come from
  each layout's own masks)."""
  rows, packed, steering, vocab = tokenized_kto
  cfg = CFG.replace(vocab_size=vocab, max_position_embeddings=256)
  nll_weight = 0.5 if reference == "cached" else 0.0
  stage = HybridStage(HybridConfig(reference=reference, nll_weight=nll_weight), tile_size=16)

  def loss_and_grads(batch, axes):
    mesh = _mesh(axes)
    graphdef, graphdef_eval, params, rngs, frozen = _model(mesh, cfg)
    ref = jax.tree.map(lambda x: x * 0.9, params)  # a reference that differs from the policy
    batch = shd.put_batch(batch, mesh)
    if reference == "cached":
      batch = batch.replace(reference=jax.jit(stage.reference_fn(graphdef_eval))(ref, rngs, frozen,
                                                                                  batch))
      ref = None
    fn = jax.jit(jax.value_and_grad(stage.loss_fn(graphdef, graphdef_eval, steering),
                                    has_aux=True))
    (loss, (metrics, _)), grads = fn(params, rngs, frozen, ref, batch)
    return jax.device_get((loss, metrics, nnx.to_pure_dict(grads)))

  loss_r, metrics_r, grads_r = loss_and_grads(rows, {"data": 1, "fsdp": 1, "tensor": 1})
  loss_p, metrics_p, grads_p = loss_and_grads(packed, {"data": 2, "fsdp": 2, "tensor": 1})
  np.testing.assert_allclose(loss_p, loss_r, rtol=1e-5)
  assert set(metrics_p) == set(metrics_r)
  assert ("nll" in metrics_r) == bool(nll_weight)
  for k in metrics_r:
    np.testing.assert_allclose(metrics_p[k], metrics_r[k], rtol=1e-4, atol=1e-6, err_msg=k)
  _close_tree(grads_r, grads_p, rtol=1e-3, scale_atol=1e-6)


def test_packed_step_flops_count_the_shared_prompt_once():
  """FLOPs of a packed batch: the transformer over the packed tokens (3x policy + 1x reference), the
  output projection over the labels only; fewer than the rows layout of the same sequences."""
  from distfair_jax.train.flops import forward_flops_per_token
  head = 2.0 * CFG.hidden_size * CFG.vocab_size
  packed = B.PackedHybridBatch(B.Packed.abstract(4, 64, 2, 16), None, None)
  body = 4 * 64 * (forward_flops_per_token(CFG, 64) - head)
  labels = 8 * 16 * head
  # policy: targets 3x, mismatched 1x (half the labels each); reference: every label once
  assert HYBRID.flops(CFG, packed) == pytest.approx(4 * body + 3 * labels / 2 + labels / 2 + labels)
  cached = dataclasses.replace(HYBRID, cfg=dataclasses.replace(HYBRID.cfg, reference="cached"))
  assert cached.flops(CFG, packed) == pytest.approx(3 * body + 2 * labels)
  rows = B.HybridBatch.abstract(8, 64, 2, cached=False)
  assert HYBRID.flops(CFG, rows) == pytest.approx(6 * 8 * 64 * forward_flops_per_token(CFG, 64))
  assert HYBRID.flops(CFG, packed) < 0.5 * HYBRID.flops(CFG, rows)
  assert HYBRID.flops(CFG, packed, processes=2) == pytest.approx(2 * HYBRID.flops(CFG, packed))


@pytest.mark.slow
def test_packed_dpo_equals_rows():
  """DPO on [prompt | chosen | rejected] rows gives the rows layout's loss, metrics and gradients."""
  from distfair_jax.data import build, collate
  from distfair_jax.data.tokenizer import build_tiny_tokenizer
  tok = build_tiny_tokenizer()
  recs = build.build_dataset("gender_real_us", rows_per_occupation=4, test_rounds=1)["dpo"][:4]
  rows = collate.tokenize_batch(recs, tok, "dpo")
  packed = collate.tokenize_batch(recs, tok, "dpo", layout="packed")
  assert packed.packed.input_ids.shape[0] == 4 and packed.packed.groups == 1
  stage = DPOStage(DPOConfig(), tile_size=16)
  stage.check_batch(packed)
  cfg = CFG.replace(vocab_size=len(tok), max_position_embeddings=256)
  graphdef, graphdef_eval, params, rngs, frozen = split_model(Llama(cfg, rngs=nnx.Rngs(0)), False)
  ref = jax.tree.map(lambda x: x * 0.9, params)
  fn = jax.value_and_grad(stage.loss_fn(graphdef, graphdef_eval, None), has_aux=True)
  out = [jax.device_get(fn(params, rngs, frozen, ref, jax.tree.map(jnp.asarray, b)))
         for b in (rows, packed)]
  (loss_r, (metrics_r, _)), grads_r = out[0]
  (loss_p, (metrics_p, _)), grads_p = out[1]
  np.testing.assert_allclose(loss_p, loss_r, rtol=1e-5)
  for k in metrics_r:
    np.testing.assert_allclose(metrics_p[k], metrics_r[k], rtol=1e-4, atol=1e-6, err_msg=k)
  _close_tree(nnx.to_pure_dict(grads_r), nnx.to_pure_dict(grads_p), rtol=1e-3, scale_atol=1e-6)


def test_ipo_uses_per_token_averaged_logps():
  """dpo.ipo: the stage passes per-token means of the completions' log-probs to the IPO loss,
  in both layouts (summed log-probs were off by tens on a real batch)."""
  from distfair_jax.data import build, collate
  from distfair_jax.data.tokenizer import build_tiny_tokenizer
  from distfair_jax import losses
  from distfair_jax.train.stages.common import merge, sequence_logps
  from distfair_jax.train.stages.hybrid import _concat
  tok = build_tiny_tokenizer()
  recs = build.build_dataset("gender_real_us", rows_per_occupation=4, test_rounds=1)["dpo"][:4]
  rows = collate.tokenize_batch(recs, tok, "dpo")
  packed = collate.tokenize_batch(recs, tok, "dpo", layout="packed")
  stage = DPOStage(DPOConfig(ipo=True, beta=0.1), tile_size=16)
  cfg = CFG.replace(vocab_size=len(tok), max_position_embeddings=256)
  graphdef, graphdef_eval, params, rngs, frozen = split_model(Llama(cfg, rngs=nnx.Rngs(0)), False)
  ref = jax.tree.map(lambda x: x * 0.9, params)
  fn = stage.loss_fn(graphdef, graphdef_eval, None)
  loss_r = fn(params, rngs, frozen, ref, jax.tree.map(jnp.asarray, rows))[0]
  loss_p = fn(params, rngs, frozen, ref, jax.tree.map(jnp.asarray, packed))[0]
  both = _concat(rows.chosen, rows.rejected)
  counts = np.concatenate([rows.chosen.label_mask.sum(-1), rows.rejected.label_mask.sum(-1)])
  assert counts.min() > 1  # the test means something: sums and means differ
  pol = sequence_logps(merge(graphdef, params, rngs, frozen), both, 16)[3] / counts
  rfl = sequence_logps(merge(graphdef_eval, ref, rngs, frozen), both, 16)[3] / counts
  b = len(recs)
  expected = losses.dpo_loss(pol[:b], pol[b:], rfl[:b], rfl[b:], beta=0.1, ipo=True)[0]
  np.testing.assert_allclose(loss_r, expected, rtol=1e-5)
  np.testing.assert_allclose(loss_p, expected, rtol=1e-4)
