"""Tests for distfair_jax.losses.

Each function against an independent NumPy transcription of its formula, gradients, tiled vs
untiled log-probs, jit / vmap, and a batch sharded over 8 simulated CPU devices.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from distfair_jax import losses
from distfair_jax.errors import InputError

# ------------------------------------------------------------------------------------------------
# NumPy transcriptions (float64)
# ------------------------------------------------------------------------------------------------


def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(axis=-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def np_token_logps(logits, labels, mask):
  ls = np_log_softmax(logits)
  out = np.zeros(labels.shape)
  for idx in np.ndindex(*labels.shape):
    if mask[idx]:
      out[idx] = ls[idx + (labels[idx],)]
  return out


def np_sigmoid(x):
  return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def np_kl(p, log_q):
  out = np.zeros(p.shape[0])
  for i in range(p.shape[0]):
    for k in range(p.shape[1]):
      if p[i, k] > 0:
        out[i] += p[i, k] * (np.log(p[i, k]) - log_q[i, k])
  return out


def np_kto(pol, ref, pol_kl, ref_kl, desirable, beta, wd, wu, kl_mask=None):
  kl_mask = np.ones(len(pol), bool) if kl_mask is None else np.asarray(kl_mask, bool)
  diffs = [pk - rk for pk, rk, m in zip(pol_kl, ref_kl, kl_mask) if m]
  z0 = max(0.0, float(np.mean(diffs))) if diffs else 0.0
  per = []
  for p, r, d in zip(pol, ref, desirable):
    reward = p - r
    if d:
      per.append(wd * (1 - np_sigmoid(beta * (reward - z0))))
    else:
      per.append(wu * (1 - np_sigmoid(beta * (z0 - reward))))
  return float(np.mean(per)), z0


def close(a, b, rtol=1e-5, atol=1e-5):
  np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=rtol,
                             atol=atol)


@pytest.fixture(scope="module")
def rng():
  return np.random.default_rng(1234)


# ------------------------------------------------------------------------------------------------
# token_logps / sequence_logps
# ------------------------------------------------------------------------------------------------


def test_token_logps_matches_numpy_with_mask_and_ties(rng):
  b, l, v = 3, 5, 11
  logits = rng.normal(size=(b, l, v)).astype(np.float32) * 3
  logits[0, 0] = 1.5  # a row of ties: log(1 / v) for any label
  logits[1, 2, :4] = logits[1, 2, 4]  # ties with the label's logit
  labels = rng.integers(0, v, (b, l))
  labels[1, 2] = 4
  mask = rng.random((b, l)) > 0.3
  mask[0, 0] = mask[1, 2] = True
  labels_junk = np.where(mask, labels, -100)  # masked labels may be anything
  got = losses.token_logps(jnp.asarray(logits), jnp.asarray(labels_junk), jnp.asarray(mask))
  assert got.dtype == jnp.float32 and got.shape == (b, l)
  close(got, np_token_logps(logits, labels, mask))
  close(got[0, 0], -np.log(v))
  assert np.all(np.asarray(got)[~mask] == 0)
  # bfloat16 logits are upcast, never computed in bfloat16
  got16 = losses.token_logps(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(labels), None)
  ref16 = np_token_logps(np.asarray(jnp.asarray(logits, jnp.bfloat16), np.float32), labels,
                         np.ones((b, l), bool))
  assert got16.dtype == jnp.float32
  close(got16, ref16, rtol=1e-5, atol=1e-5)


def test_token_logps_masked_positions_get_no_gradient(rng):
  logits = jnp.asarray(rng.normal(size=(2, 4, 7)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 7, (2, 4)))
  mask = jnp.asarray([[1, 1, 0, 0], [0, 1, 1, 1]])
  grad = jax.grad(lambda x: jnp.sum(losses.token_logps(x, labels, mask)))(logits)
  assert np.all(np.asarray(grad)[np.asarray(mask) == 0] == 0)
  # softmax - onehot rows sum to zero
  close(np.asarray(grad).sum(-1), 0.0, atol=1e-6)


def test_sequence_logps_sum_and_mean(rng):
  tok = rng.normal(size=(3, 6)).astype(np.float32)
  mask = (rng.random((3, 6)) > 0.4).astype(np.float32)
  mask[2] = 0  # a sequence without counted tokens
  total = (tok * mask).sum(-1)
  close(losses.sequence_logps(tok, mask), total)
  mean = np.where(mask.sum(-1) > 0, total / np.maximum(mask.sum(-1), 1), 0.0)
  got = losses.sequence_logps(tok, mask, average=True)
  close(got, mean)
  assert np.isfinite(np.asarray(got)).all() and float(got[2]) == 0.0


# ------------------------------------------------------------------------------------------------
# steering
# ------------------------------------------------------------------------------------------------


def test_steering_log_probs_and_kl_match_numpy(rng):
  b, v = 4, 13
  ids = np.array([3, 7, 9])
  logits = rng.normal(size=(b, v)).astype(np.float32)
  target = rng.random((b, 3))
  target[1, 0] = 0.0  # zero target probabilities
  target[2, :2] = 0.0
  target /= target.sum(-1, keepdims=True)
  weights = np.array([1.0, 0.0, 1.0, 1.0])

  full = np_log_softmax(logits)[:, ids]
  renorm = np_log_softmax(logits[:, ids])
  close(losses.steering_log_probs(logits, ids), full)
  close(losses.steering_log_probs(logits, ids, renormalize=True), renorm)
  close(losses.steering_log_probs(logits, np.tile(ids, (b, 1))), full)  # per-example ids

  for log_q, renormalize in ((full, False), (renorm, True)):
    per = np_kl(target, log_q)
    mean, per_example = losses.steering_kl(logits, ids, target, weights=weights,
                                           renormalize=renormalize)
    close(per_example, per)
    close(mean, (per * weights).sum() / weights.sum())
    mean_all, _ = losses.steering_kl(logits, ids, target, renormalize=renormalize)
    close(mean_all, per.mean())
  # the full-vocabulary KL = the renormalised KL - log(mass on the steering tokens)
  mass = np.exp(full).sum(-1)
  close(np_kl(target, full), np_kl(target, renorm) - np.log(mass))
  mean0, _ = losses.steering_kl(logits, ids, target, weights=np.zeros(b))
  assert float(mean0) == 0.0


def test_steering_kl_zero_with_zero_gradient_at_target(rng):
  v, ids = 10, np.array([2, 5, 8])
  target = np.array([[0.5, 0.3, 0.2], [0.0, 0.25, 0.75]])
  logits = rng.normal(size=(2, v)).astype(np.float32)
  with np.errstate(divide="ignore"):
    logits[:, ids] = np.where(target > 0, np.log(target), -1e4) + 1.7  # softmax over ids = target

  def f(x):
    return losses.steering_kl(x, ids, target, renormalize=True)[0]

  value, grad = jax.value_and_grad(f)(jnp.asarray(logits))
  assert abs(float(value)) < 1e-6
  close(grad, 0.0, atol=1e-6)
  # positive elsewhere, and with the full-vocabulary variant (mass outside the steering tokens)
  assert float(f(jnp.asarray(logits) + jnp.asarray(rng.normal(size=(2, v)), jnp.float32))) > 1e-4
  assert float(losses.steering_kl(logits, ids, target)[0]) > 1e-4


def test_steering_logits_from_hidden(rng):
  hidden = rng.normal(size=(3, 6, 4)).astype(np.float32)
  w = rng.normal(size=(4, 9)).astype(np.float32)
  pos = np.array([0, 5, 2])
  got = losses.steering_logits_from_hidden(hidden, w, pos)
  assert got.shape == (3, 9) and got.dtype == jnp.float32
  close(got, np.einsum("bd,dv->bv", hidden[np.arange(3), pos], w), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# KTO
# ------------------------------------------------------------------------------------------------


def _kto_inputs(rng, b=6):
  return [rng.normal(size=b).astype(np.float32) * 5 - 20 for _ in range(4)]


@pytest.mark.parametrize("desirable", [[1, 0, 1, 0, 1, 0], [1] * 6, [0] * 6],
                         ids=["mixed", "only_desirable", "only_undesirable"])
def test_kto_loss_matches_numpy(rng, desirable):
  pol, ref, pol_kl, ref_kl = _kto_inputs(rng)
  pol_kl = ref_kl + np.abs(pol_kl - ref_kl)  # z0 > 0
  desirable = np.array(desirable)
  for beta, wd, wu in ((0.1, 1.0, 1.0), (0.5, 1.3, 0.7)):
    loss, metrics = losses.kto_loss(pol, ref, pol_kl, ref_kl, desirable, beta=beta,
                                    desirable_weight=wd, undesirable_weight=wu)
    want, z0 = np_kto(pol, ref, pol_kl, ref_kl, desirable, beta, wd, wu)
    close(loss, want)
    close(metrics["kl"], z0)
    for name, value in metrics.items():
      assert np.isfinite(float(value)), name
    good, bad = desirable == 1, desirable == 0
    r = beta * (pol - ref)
    close(metrics["rewards/chosen"], r[good].mean() if good.any() else 0.0)
    close(metrics["rewards/rejected"], r[bad].mean() if bad.any() else 0.0)
    close(metrics["rewards/margins"],
          float(metrics["rewards/chosen"]) - float(metrics["rewards/rejected"]))
    close(metrics["logps/chosen"], pol[good].mean() if good.any() else 0.0)
    close(metrics["logps/rejected"], pol[bad].mean() if bad.any() else 0.0)
    assert float(metrics["count/chosen"]) == good.sum()


def test_kto_reference_point_clamped_and_kl_mask(rng):
  pol, ref, pol_kl, ref_kl = _kto_inputs(rng)
  desirable = np.array([1, 0, 1, 0, 1, 0])
  neg = ref_kl - np.abs(pol_kl - ref_kl) - 0.1  # mean KL < 0 -> z0 = 0
  loss, metrics = losses.kto_loss(pol, ref, neg, ref_kl, desirable)
  assert float(metrics["kl"]) == 0.0
  close(loss, np_kto(pol, ref, neg, ref_kl, desirable, 0.1, 1, 1)[0])
  kl_mask = np.array([1, 1, 0, 1, 0, 0])
  loss, metrics = losses.kto_loss(pol, ref, pol_kl, ref_kl, desirable, kl_mask=kl_mask)
  want, z0 = np_kto(pol, ref, pol_kl, ref_kl, desirable, 0.1, 1, 1, kl_mask)
  close(loss, want)
  close(metrics["kl"], z0)


def test_kto_gradient_closed_form_and_z0_has_no_gradient(rng):
  pol, ref, pol_kl, ref_kl = _kto_inputs(rng)
  pol_kl = ref_kl + np.abs(pol_kl - ref_kl)
  desirable = np.array([1, 0, 0, 1, 1, 0])
  beta, wd, wu, b = 0.3, 1.2, 0.8, len(pol)

  def f(p, pk, rk):
    return losses.kto_loss(p, ref, pk, rk, desirable, beta=beta, desirable_weight=wd,
                           undesirable_weight=wu)[0]

  g_pol, g_pol_kl, g_ref_kl = jax.grad(f, argnums=(0, 1, 2))(pol, pol_kl, ref_kl)
  z0 = np.mean(pol_kl - ref_kl)
  r = pol - ref
  s_good = np_sigmoid(beta * (r - z0))
  s_bad = np_sigmoid(beta * (z0 - r))
  want = np.where(desirable == 1, -wd * beta * s_good * (1 - s_good),
                  wu * beta * s_bad * (1 - s_bad)) / b
  close(g_pol, want, rtol=1e-5, atol=1e-8)
  assert np.all(np.asarray(g_pol_kl) == 0) and np.all(np.asarray(g_ref_kl) == 0)
  # perturbing the KL log-probs inside the gradient changes nothing but the reference point
  g_shift = jax.grad(lambda pk: jax.grad(f)(pol, pk, ref_kl).sum())(pol_kl)
  assert np.all(np.asarray(g_shift) == 0)


# ------------------------------------------------------------------------------------------------
# SFT, DPO
# ------------------------------------------------------------------------------------------------


def test_sft_loss_token_and_sequence(rng):
  tok = -np.abs(rng.normal(size=(4, 5))).astype(np.float32)
  mask = (rng.random((4, 5)) > 0.3).astype(np.float32)
  mask[0] = [1, 1, 1, 1, 1]
  mask[3] = 0  # an all-padding row
  close(losses.sft_loss(tok, mask), -(tok * mask).sum() / mask.sum())
  rows = [(tok[i] * mask[i]).sum() / mask[i].sum() for i in range(4) if mask[i].sum() > 0]
  close(losses.sft_loss(tok, mask, average="sequence"), -np.mean(rows))
  assert float(losses.sft_loss(tok, np.zeros_like(mask))) == 0.0
  with pytest.raises(ValueError, match="token"):
    losses.sft_loss(tok, mask, average="batch")


def test_dpo_loss_variants(rng):
  pc, pr, rc, rr = [rng.normal(size=5).astype(np.float32) * 3 - 10 for _ in range(4)]
  h = (pc - pr) - (rc - rr)
  beta = 0.2
  log_sig = lambda x: -np.log1p(np.exp(-x))
  for eps in (0.0, 0.15):
    loss, metrics = losses.dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    close(loss, np.mean(-(1 - eps) * log_sig(beta * h) - eps * log_sig(-beta * h)))
  loss, _ = losses.dpo_loss(pc, pr, rc, rr, beta=beta, ipo=True)
  close(loss, np.mean((h - 1 / (2 * beta)) ** 2), rtol=1e-5)
  close(metrics["rewards/chosen"], np.mean(beta * (pc - rc)))
  close(metrics["rewards/rejected"], np.mean(beta * (pr - rr)))
  close(metrics["rewards/margins"], np.mean(beta * h))
  close(metrics["rewards/accuracies"], np.mean(pc - rc > pr - rr))
  close(metrics["logps/chosen"], pc.mean())
  close(metrics["logps/rejected"], pr.mean())
  with pytest.raises(ValueError, match="label_smoothing"):
    losses.dpo_loss(pc, pr, rc, rr, ipo=True, label_smoothing=0.1)


# ------------------------------------------------------------------------------------------------
# hybrid objective, balance warning, input errors
# ------------------------------------------------------------------------------------------------


def test_hybrid_loss_ablations(rng):
  pol, ref, pol_kl, ref_kl = _kto_inputs(rng)
  kto = losses.kto_loss(pol, ref, pol_kl, ref_kl, np.array([1, 0] * 3))
  steer = losses.steering_kl(rng.normal(size=(6, 9)), np.array([1, 2]), np.full((6, 2), 0.5))
  k, s = float(kto[0]), float(steer[0])
  loss, metrics = losses.hybrid_loss(kto, steer, kl_weight=0.5)
  close(loss, k + 0.5 * s)
  close(metrics["loss"], k + 0.5 * s)
  close(metrics["kto_loss"], k)
  close(metrics["steering_kl"], s)
  assert "rewards/chosen" in metrics and "kl" in metrics  # kto_loss's metrics are carried over
  close(losses.hybrid_loss(k, s, ablation="kl_only")[0], s)
  close(losses.hybrid_loss(k, s, ablation="kto_only")[0], k)
  close(losses.hybrid_loss(None, steer, ablation="kl_only")[0], s)
  loss, metrics = losses.hybrid_loss(kto, None, ablation="kto_only")
  close(loss, k)
  assert "steering_kl" not in metrics
  with pytest.raises(ValueError, match="full, kl_only, kto_only"):
    losses.hybrid_loss(k, s, ablation="kl")
  with pytest.raises(ValueError, match="steering"):
    losses.hybrid_loss(k, None)


def test_desirable_nll_anchors_the_desirable_completions_only(rng):
  pol = rng.normal(size=6) * 5 - 20
  lengths = np.array([4, 6, 5, 3, 7, 2])
  desirable = np.array([1, 1, 0, 1, 0, 0])
  good = desirable.astype(bool)
  close(losses.desirable_nll(pol, lengths, desirable), -pol[good].sum() / lengths[good].sum())
  grad = jax.grad(lambda p: losses.desirable_nll(p, lengths, desirable))(jnp.asarray(pol))
  np.testing.assert_allclose(grad, np.where(good, -1.0 / lengths[good].sum(), 0.0), rtol=1e-6)
  close(losses.desirable_nll(pol, lengths, np.zeros(6)), 0.0)  # no desirable row: no NaN
  with pytest.raises(InputError, match="desirable_nll"):
    losses.desirable_nll(pol, lengths[:5], desirable)
  steer, kto = 0.3, 0.7
  nll = losses.desirable_nll(pol, lengths, desirable)
  loss, metrics = losses.hybrid_loss(kto, steer, nll=nll, nll_weight=0.25)
  close(loss, kto + steer + 0.25 * float(nll))
  close(metrics["nll"], float(nll))
  # a zero weight reports the term but leaves the paper's objective
  loss, metrics = losses.hybrid_loss(kto, steer, ablation="kl_only", nll=nll)
  close(loss, steer)
  close(metrics["nll"], float(nll))
  close(losses.hybrid_loss(None, steer, ablation="kl_only", nll=nll, nll_weight=1.0)[0],
        steer + float(nll))
  with pytest.raises(ValueError, match="nll"):
    losses.hybrid_loss(kto, steer, nll_weight=0.5)


def test_check_kto_balance_warns_outside_range():
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert losses.check_kto_balance(8, 8) == 1.0
    assert losses.check_kto_balance(4, 3) == pytest.approx(4 / 3)
  with pytest.warns(UserWarning, match=r"\[1, 4/3\]"):
    assert losses.check_kto_balance(10, 5) == 2.0
  with pytest.warns(UserWarning, match=r"\[1, 4/3\]"):
    assert losses.check_kto_balance(5, 10) == 0.5
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # the weights rebalance it
    assert losses.check_kto_balance(5, 10, desirable_weight=2.0) == 1.0
  with pytest.warns(UserWarning):
    assert losses.check_kto_balance(3, 0) == float("inf")
  with pytest.raises(InputError):
    losses.check_kto_balance(0, 0)


def test_bad_inputs_raise_input_error():
  h, w, y = jnp.zeros((2, 5, 4)), jnp.zeros((4, 9)), jnp.zeros((2, 5), jnp.int32)
  for bad in (0, -3, 2.5, True):
    with pytest.raises(InputError, match="losses.py: tile_size"):
      losses.token_logps_from_hidden(h, w, y, None, bad)
  with pytest.raises(InputError, match="unembedding"):
    losses.token_logps_from_hidden(h, jnp.zeros((5, 9)), y, None)
  with pytest.raises(InputError, match="labels"):
    losses.token_logps(jnp.zeros((2, 5, 9)), jnp.zeros((2, 4), jnp.int32), None)
  with pytest.raises(InputError, match="target_probs"):
    losses.steering_kl(jnp.zeros((2, 9)), jnp.array([1, 2]), jnp.full((2, 3), 1 / 3))


# ------------------------------------------------------------------------------------------------
# tiled log-probs from hidden states
# ------------------------------------------------------------------------------------------------


def _untiled(hidden, w, labels, mask, softcap=None):
  logits = jnp.einsum("bld,dv->blv", hidden, w, preferred_element_type=jnp.float32)
  if softcap is not None:  # Gemma 2's final-logit soft-capping, written out
    logits = softcap * jnp.tanh(logits / softcap)
  return losses.token_logps(logits, labels, mask)


@pytest.fixture(scope="module")
def lm_inputs():
  r = np.random.default_rng(7)
  b, l, d, v = 2, 7, 8, 37
  return dict(
      hidden=r.normal(size=(b, l, d)).astype(np.float32),
      w=(r.normal(size=(d, v)) / np.sqrt(d)).astype(np.float32) * 3,
      labels=np.where(r.random((b, l)) > 0.2, r.integers(0, v, (b, l)), -100),
      g=r.normal(size=(b, l)).astype(np.float32),
  )


@pytest.mark.parametrize("dtype,tile_size,softcap", [
    ("float32", 3, None), ("bfloat16", 3, None), ("float32", 16, None), ("float32", 3, 1.5),
    ("bfloat16", 3, 1.5)])
def test_token_logps_from_hidden_matches_untiled(lm_inputs, dtype, tile_size, softcap):
  """tile 3 over length 7: 3 tiles, the last one padded, and a short last vocabulary chunk in
  the backward pass; tile 16 >= length: a single tile; softcap 1.5 (the logits reach ~5): the
  log-probs of the capped logits, gradients through the cap on all three backward paths."""
  x = lm_inputs
  hidden, w = jnp.asarray(x["hidden"], dtype), jnp.asarray(x["w"], dtype)
  mask = jnp.asarray(x["labels"] >= 0)
  labels, g = jnp.asarray(x["labels"]), jnp.asarray(x["g"])

  def weighted(fn):
    return lambda h, u: jnp.sum(g * fn(h, u, labels, mask))

  tiled = lambda h, u, y, m: losses.token_logps_from_hidden(h, u, y, m, tile_size,
                                                            softcap=softcap)
  untiled = lambda h, u, y, m: _untiled(h, u, y, m, softcap)

  @jax.jit
  def run(h, u):
    return dict(
        got=tiled(h, u, labels, mask),
        want=untiled(h, u, labels, mask),
        grads=jax.grad(weighted(tiled), argnums=(0, 1))(h, u),
        want_grads=jax.grad(weighted(untiled), argnums=(0, 1))(h, u),
        # frozen unembedding (as with LoRA) and constant hidden states take other paths
        grad_h_only=jax.grad(weighted(tiled))(h, u),
        grad_w_only=jax.grad(weighted(tiled), argnums=1)(jax.lax.stop_gradient(h), u),
    )

  out = run(hidden, w)
  got, want = out["got"], out["want"]
  assert got.dtype == jnp.float32 and got.shape == labels.shape
  assert np.all(np.asarray(got)[~np.asarray(mask)] == 0)
  tol = dict(rtol=1e-5, atol=1e-5) if dtype == "float32" else dict(rtol=2e-2, atol=2e-2)
  close(got, want, **tol)
  (gh, gw), (wh, ww) = out["grads"], out["want_grads"]
  assert gh.dtype == hidden.dtype and gw.dtype == w.dtype
  for a, b in ((gh, wh), (gw, ww), (out["grad_h_only"], wh), (out["grad_w_only"], ww)):
    b = b.astype(jnp.float32)
    close(a.astype(jnp.float32), b, rtol=tol["rtol"], atol=tol["atol"] * float(jnp.abs(b).max()))


def test_token_logps_from_hidden_matches_numpy(lm_inputs):
  x = lm_inputs
  mask = x["labels"] >= 0
  logits = np.einsum("bld,dv->blv", x["hidden"].astype(np.float64), x["w"])
  got = losses.token_logps_from_hidden(x["hidden"], x["w"], x["labels"], mask, 3)
  close(got, np_token_logps(logits, np.where(mask, x["labels"], 0), mask), rtol=1e-5, atol=1e-5)
  assert np.abs(logits).max() > 3  # the cap below bites
  capped = losses.token_logps_from_hidden(x["hidden"], x["w"], x["labels"], mask, 3, softcap=2.0)
  close(capped, np_token_logps(2.0 * np.tanh(logits / 2.0), np.where(mask, x["labels"], 0), mask),
        rtol=1e-5, atol=1e-5)
  with pytest.raises(InputError, match="softcap: expected a positive number"):
    losses.token_logps_from_hidden(x["hidden"], x["w"], x["labels"], mask, 3, softcap=0.0)


def test_steering_kl_through_the_soft_cap(lm_inputs):
  """Steering logits and the steering KL of capped logits, value and gradient, against the same
  computed from the full capped logits."""
  x = lm_inputs
  h, w = jnp.asarray(x["hidden"]), jnp.asarray(x["w"])
  pos, ids = jnp.asarray([6, 3]), jnp.asarray([1, 4, 9])
  target = jnp.asarray([[0.2, 0.5, 0.3], [0.0, 0.5, 0.5]])

  def via_steering(h, u):
    return losses.steering_kl(losses.steering_logits_from_hidden(h, u, pos, softcap=2.0), ids,
                              target)[0]

  def via_full(h, u):
    logits = 2.0 * jnp.tanh(jnp.einsum("bld,dv->blv", h, u) / 2.0)
    return losses.steering_kl(logits[jnp.arange(2), pos], ids, target)[0]

  close(via_steering(h, w), via_full(h, w), rtol=1e-6, atol=1e-6)
  for a, b in zip(jax.grad(via_steering, argnums=(0, 1))(h, w),
                  jax.grad(via_full, argnums=(0, 1))(h, w)):
    close(a, b, rtol=1e-5, atol=1e-6)
  assert abs(float(via_steering(h, w)) - float(losses.steering_kl(
      losses.steering_logits_from_hidden(h, w, pos), ids, target)[0])) > 1e-3


# ------------------------------------------------------------------------------------------------
# jit, vmap, sharding
# ------------------------------------------------------------------------------------------------


def _all_losses(hidden, w, labels, mask, steer_pos, ids, target, desirable, ref_seq, kl_seq,
                ref_kl_seq):
  """One function using every loss; returns (hybrid loss, grads w.r.t. hidden and w, extras)."""

  def objective(h, u):
    tok = losses.token_logps_from_hidden(h, u, labels, mask, 3)
    seq = losses.sequence_logps(tok, mask)
    steer = losses.steering_logits_from_hidden(h, u, steer_pos)
    kto = losses.kto_loss(seq, ref_seq, kl_seq, ref_kl_seq, desirable)
    kl = losses.steering_kl(steer, ids, target, weights=desirable)
    loss, metrics = losses.hybrid_loss(kto, kl)
    metrics["sft"] = losses.sft_loss(tok, mask, average="sequence")
    metrics["dpo"] = losses.dpo_loss(seq, ref_seq, kl_seq, ref_kl_seq)[0]
    metrics["per_example_kl"] = kl[1]
    return loss, metrics

  (loss, metrics), grads = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(hidden, w)
  return loss, grads, metrics


@pytest.fixture(scope="module")
def batch8():
  r = np.random.default_rng(3)
  b, l, d, v, k = 8, 7, 8, 37, 3
  target = r.random((b, k))
  target[0, 1] = 0
  return dict(
      hidden=r.normal(size=(b, l, d)).astype(np.float32),
      w=(r.normal(size=(d, v)) / np.sqrt(d)).astype(np.float32),
      labels=r.integers(0, v, (b, l)).astype(np.int32),
      mask=(np.arange(l)[None, :] >= r.integers(1, 4, (b, 1))).astype(np.float32),
      steer_pos=r.integers(0, l, b).astype(np.int32),
      ids=np.array([4, 9, 20], np.int32),
      target=(target / target.sum(-1, keepdims=True)).astype(np.float32),
      desirable=np.array([1, 0] * 4, np.int32),
      ref_seq=r.normal(size=b).astype(np.float32) - 20,
      kl_seq=r.normal(size=b).astype(np.float32) - 20,
      ref_kl_seq=r.normal(size=b).astype(np.float32) - 21,
  )


_all_losses_jit = jax.jit(_all_losses)


def np_all_losses(hidden, w, labels, mask, steer_pos, ids, target, desirable, ref_seq, kl_seq,
                  ref_kl_seq):
  """NumPy transcription of the values computed by _all_losses."""
  logits = np.einsum("bld,dv->blv", hidden.astype(np.float64), w)
  tok = np_token_logps(logits, labels, mask > 0)
  seq = tok.sum(-1)
  kto, _ = np_kto(seq, ref_seq, kl_seq, ref_kl_seq, desirable, 0.1, 1.0, 1.0)
  steer = logits[np.arange(len(steer_pos)), steer_pos]
  per_kl = np_kl(target, np_log_softmax(steer)[:, ids])
  kl = (per_kl * desirable).sum() / desirable.sum()
  return kto + kl, kto, kl, per_kl


@pytest.fixture(scope="module")
def reference(batch8):
  """_all_losses under jit on one device, checked against NumPy."""
  args = {k: jax.device_put(v, jax.devices()[0]) for k, v in batch8.items()}
  out = _all_losses_jit(**args)
  loss, _, metrics = out
  want, kto, kl, per_kl = np_all_losses(**batch8)
  close(loss, want, rtol=1e-5, atol=1e-5)
  close(metrics["kto_loss"], kto, rtol=1e-5, atol=1e-6)
  close(metrics["steering_kl"], kl, rtol=1e-5, atol=1e-6)
  close(metrics["per_example_kl"], per_kl, rtol=1e-5, atol=1e-6)
  return out


def _assert_tree_close(a, b, rtol=1e-5, atol=1e-5):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    close(x, y, rtol=rtol, atol=atol)


def test_jit_and_vmap(batch8, reference):
  args = {k: jnp.asarray(v) for k, v in batch8.items()}
  # vmap over a leading axis of two independent batches (the second: a permuted copy)
  perm = np.array([1, 0, 3, 2, 5, 4, 7, 6])
  batch_axis = {"hidden", "labels", "mask", "steer_pos", "target", "desirable", "ref_seq",
                "kl_seq", "ref_kl_seq"}
  stacked = {k: jnp.stack([v, v[perm]]) if k in batch_axis else v for k, v in args.items()}
  in_axes = {k: 0 if k in batch_axis else None for k in args}
  out = jax.jit(jax.vmap(lambda kw: _all_losses(**kw), in_axes=(in_axes,)))(stacked)
  _assert_tree_close(jax.tree.map(lambda x: x[0], out), reference)
  second = _all_losses_jit(**{k: v[1] if k in batch_axis else v for k, v in stacked.items()})
  _assert_tree_close(jax.tree.map(lambda x: x[1], out), second)


def test_sharded_batch_over_8_devices(batch8, reference):
  devices = jax.devices()
  assert len(devices) == 8, "tests/conftest.py should give 8 simulated CPU devices"
  mesh = Mesh(np.array(devices), ("data",))
  replicated = {"w", "ids"}
  args = {k: jax.device_put(v, NamedSharding(mesh, P() if k in replicated else P("data")))
          for k, v in batch8.items()}
  assert args["hidden"].sharding.shard_shape(args["hidden"].shape)[0] == 1
  out = _all_losses_jit(**args)
  _assert_tree_close(out, reference)
  loss, (gh, gw), metrics = out
  assert gh.sharding.is_equivalent_to(args["hidden"].sharding, gh.ndim)


def test_kto_metrics_of_an_absent_class_are_left_out():
  """A batch with no undesirable rows: kto_loss's fixed-structure metrics hold 0 there, and
  drop_absent_classes leaves rewards/rejected, logps/rejected and the margin out (as TRL)."""
  pol = jnp.array([-3.0, -2.0]); ref = jnp.array([-3.5, -2.5])
  _, m = losses.kto_loss(pol, ref, pol - 1.0, ref - 1.0, jnp.array([True, True]))
  logged = losses.drop_absent_classes({k: float(v) for k, v in m.items()})
  assert float(m["count/rejected"]) == 0 and float(m["rewards/rejected"]) == 0.0
  assert not {"rewards/rejected", "logps/rejected", "rewards/margins"} & set(logged)
  assert logged["rewards/chosen"] == pytest.approx(0.1 * 0.5)
  _, m = losses.kto_loss(pol, ref, pol - 1.0, ref - 1.0, jnp.array([True, False]))
  both = losses.drop_absent_classes({k: float(v) for k, v in m.items()})
  assert both["rewards/margins"] == pytest.approx(both["rewards/chosen"] - both["rewards/rejected"])
  assert losses.drop_absent_classes({"loss": 1.0}) == {"loss": 1.0}   # DPO, SFT: untouched
