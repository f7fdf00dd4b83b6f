"""Metrics: hand-computed MAE / KL / JS, unparsed handling, bootstrap interval coverage."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from distfair_jax.evaluation import metrics
from distfair_jax.errors import InputError

TARGETS = {"nurse": [0.5, 0.5], "pilot": [0.2, 0.8]}


def _rows():
  # nurse: 3 x category 0, 1 x category 1, 1 unparsed -> achieved [0.75, 0.25]
  # pilot: 2 answers, both unparsed -> achieved [0, 0]
  cats = {"nurse": [0, 0, 1, None, 0], "pilot": [None, None]}
  return [{"occupation": o, "category": c, "response": "..."} for o, cs in cats.items() for c in cs]


def test_elementwise_functions():
  t = np.array([[0.5, 0.5], [1.0, 0.0]])
  a = np.array([[0.75, 0.25], [0.5, 0.5]])
  np.testing.assert_allclose(metrics.mae(t, a), [0.25, 0.5])
  # target zeros are skipped: KL([1, 0] || [.5, .5]) = ln 2
  np.testing.assert_allclose(metrics.kl_divergence(t, a), [0.5 * math.log(4 / 3), math.log(2)])
  np.testing.assert_allclose(metrics.kl_divergence([0.0, 1.0], [0.0, 1.0]), 0.0, atol=1e-9)
  # JS is symmetric, zero for equal inputs, ln 2 for disjoint supports
  np.testing.assert_allclose(metrics.js_divergence(t, a), metrics.js_divergence(a, t))
  np.testing.assert_allclose(metrics.js_divergence([0.3, 0.7], [0.3, 0.7]), 0.0, atol=1e-12)
  np.testing.assert_allclose(metrics.js_divergence([1.0, 0.0], [0.0, 1.0]), math.log(2))
  np.testing.assert_allclose(metrics.achieved_distribution([[2, 6], [0, 0]]), [[0.25, 0.75], [0, 0]])
  assert metrics.category_counts([0, None, 2, 2], 3)[0].tolist() == [1, 0, 2]
  assert metrics.category_counts([0, None, 2, 2], 3)[1] == 1


def test_evaluate_version_hand_computed():
  out = metrics.evaluate_version(_rows(), TARGETS, 2, n_bootstrap=200, seed=3,
                                 categories=["male", "female"])
  json.dumps(out, allow_nan=False)  # JSON-serialisable, finite
  nurse, pilot = out["per_occupation"]
  assert [nurse["occupation"], pilot["occupation"]] == ["nurse", "pilot"]
  np.testing.assert_allclose(nurse["achieved"], [0.75, 0.25])
  assert pilot["achieved"] == [0.0, 0.0]          # all unparsed -> all-zero achieved distribution
  assert (nurse["n"], nurse["n_unparsed"], pilot["n"], pilot["n_unparsed"]) == (5, 1, 2, 2)
  assert nurse["counts"] == [3, 1]
  np.testing.assert_allclose([nurse["mae"], pilot["mae"]], [0.25, 0.5])
  np.testing.assert_allclose(out["mae"], 0.375)
  np.testing.assert_allclose(out["mae_std"], 0.125)  # population std
  eps = 1e-10  # KL(t || a) = sum over t > 0 of t log(t / (a + eps))
  kl_nurse = 0.5 * math.log(0.5 / (0.75 + eps)) + 0.5 * math.log(0.5 / (0.25 + eps))
  kl_pilot = 0.2 * math.log(0.2 / eps) + 0.8 * math.log(0.8 / eps)
  np.testing.assert_allclose([nurse["kl"], pilot["kl"]], [kl_nurse, kl_pilot], rtol=1e-9)
  np.testing.assert_allclose(out["kl_sum"], kl_nurse + kl_pilot, rtol=1e-9)
  np.testing.assert_allclose(out["kl"], (kl_nurse + kl_pilot) / 2, rtol=1e-9)
  np.testing.assert_allclose(out["kl_std"], abs(kl_nurse - kl_pilot) / 2, rtol=1e-9)
  m = [0.625, 0.375]
  js_nurse = 0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])
                    + 0.75 * math.log(0.75 / m[0]) + 0.25 * math.log(0.25 / m[1]))
  js_pilot = 0.5 * math.log(2)  # achieved all zero: m = t / 2
  np.testing.assert_allclose([nurse["js"], pilot["js"]], [js_nurse, js_pilot], rtol=1e-9)
  np.testing.assert_allclose(out["js"], (js_nurse + js_pilot) / 2, rtol=1e-9)
  assert (out["n_samples"], out["n_unparsed"]) == (7, 3)
  np.testing.assert_allclose(out["unparsed_rate"], 3 / 7)
  assert out["categories"] == ["male", "female"]
  # intervals: ordered, and an all-unparsed occupation stays all zero in every replicate
  lo, hi = out["mae_ci"]
  assert lo <= out["mae"] <= hi
  assert pilot["achieved_ci"] == [[0.0, 0.0], [0.0, 0.0]]
  for (clo, chi), a in zip(nurse["achieved_ci"], nurse["achieved"]):
    assert 0.0 <= clo <= a <= chi <= 1.0
  assert "exact_mae" not in out


def test_seed_and_no_bootstrap():
  rng = np.random.default_rng(0)
  rows = [{"occupation": o, "category": int(c)} for o in TARGETS for c in rng.integers(0, 2, 97)]
  a = metrics.evaluate_version(rows, TARGETS, 2, n_bootstrap=300, seed=1)
  b = metrics.evaluate_version(rows, TARGETS, 2, n_bootstrap=300, seed=1)
  c = metrics.evaluate_version(rows, TARGETS, 2, n_bootstrap=300, seed=2)
  assert a == b
  assert a["mae_ci"] != c["mae_ci"]
  none = metrics.evaluate_version(rows, TARGETS, 2, n_bootstrap=0)
  assert none["mae_ci"] is None and none["per_occupation"][0]["achieved_ci"] is None
  assert none["mae"] == a["mae"]


def test_exact_distribution():
  per, mean, std = metrics.exact_mae([[0.5, 0.5], [0.2, 0.8]], [[0.6, 0.4], [0.2, 0.8]])
  np.testing.assert_allclose(per, [0.1, 0.0])
  np.testing.assert_allclose([mean, std], [0.05, 0.05])
  out = metrics.evaluate_version(_rows(), TARGETS, 2, n_bootstrap=0,
                                 exact={"nurse": [0.6, 0.4], "pilot": [0.2, 0.8]})
  np.testing.assert_allclose([out["exact_mae"], out["exact_mae_std"]], [0.05, 0.05])
  assert out["per_occupation"][0]["exact"] == [0.6, 0.4]
  np.testing.assert_allclose(out["per_occupation"][0]["exact_mae"], 0.1)
  with pytest.raises(InputError, match="exact"):
    metrics.evaluate_version(_rows(), TARGETS, 2, n_bootstrap=0, exact={"nurse": [0.6, 0.4]})


def test_occupation_order_and_subset():
  targets = {"chef": [0.5, 0.5], "pilot": [0.2, 0.8], "nurse": [0.5, 0.5]}
  out = metrics.evaluate_version(_rows(), targets, 2, n_bootstrap=0)
  assert [o["occupation"] for o in out["per_occupation"]] == ["pilot", "nurse"]  # chef: no rows


@pytest.mark.parametrize("rows, targets, match", [
    ([{"occupation": "nurse", "category": 2}], TARGETS, "category"),
    ([{"occupation": "nurse", "category": True}], TARGETS, "category"),
    ([{"occupation": "nurse", "category": "1"}], TARGETS, "category"),
    ([{"occupation": "chef", "category": 0}], TARGETS, "occupation"),
    ([{"category": 0}], TARGETS, "occupation"),
    ([{"occupation": "nurse", "category": 0}], {"nurse": [0.5, 0.6]}, "targets"),
    ([{"occupation": "nurse", "category": 0}], {"nurse": [1.0]}, "targets"),
    ([{"occupation": "nurse", "category": 0}], {"nurse": [1.5, -0.5]}, "targets"),
    ([], TARGETS, "at least one row"),
])
def test_bad_input(rows, targets, match):
  with pytest.raises(InputError, match=match):
    metrics.evaluate_version(rows, targets, 2, n_bootstrap=0, source="eval/v2.jsonl")


def test_bootstrap_coverage():
  """95 % intervals cover the truth at about the nominal rate on synthetic multinomial data."""
  rng = np.random.default_rng(12345)
  truth = np.array([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]])
  # targets far enough from the truth that no |target - achieved| changes sign: MAE is then
  # (nearly) linear in the counts and its sample value unbiased
  target = np.array([[0.55, 0.1, 0.35], [0.3, 0.45, 0.25], [0.35, 0.4, 0.25]])
  true_mae = metrics.mae(target, truth).mean()
  p_unparsed, rounds, repeats = 0.05, 100, 200
  probs = np.concatenate([truth * (1 - p_unparsed), np.full((3, 1), p_unparsed)], -1)
  cover_p = cover_mae = 0
  for r in range(repeats):
    draws = rng.multinomial(rounds, probs)  # [n_occ, K + 1]
    ci = metrics.bootstrap_intervals(target, draws[:, :-1], draws[:, -1], n_bootstrap=1000, seed=r)
    lo, hi = ci["achieved"][..., 0], ci["achieved"][..., 1]
    cover_p += np.mean((lo <= truth) & (truth <= hi))
    cover_mae += ci["mae"][0] <= true_mae <= ci["mae"][1]
  cover_p /= repeats
  cover_mae /= repeats
  print(f"coverage: achieved {cover_p:.3f}, mae {cover_mae:.3f}")
  assert 0.88 <= cover_p <= 0.99, cover_p
  assert 0.88 <= cover_mae <= 0.99, cover_mae


def test_mae_floor():
  target = np.array([[0.3, 0.7], [0.5, 0.5]])
  big, _ = metrics.mae_floor(target, [10**7, 10**7], n_bootstrap=50)
  assert big < 1e-3                                   # many rounds: a perfect model has MAE ~ 0
  none, ci = metrics.mae_floor(target, [0, 0], n_bootstrap=50)
  np.testing.assert_allclose([none, *ci], 0.5)        # no parsed answers: MAE = mean(target)
  # data drawn from the targets themselves: the measured MAE is inside the floor's range
  rng = np.random.default_rng(7)
  targets = {f"o{i}": [0.1 * i, 1 - 0.1 * i] for i in range(1, 9)}
  inside = 0
  for r in range(40):
    rows = [{"occupation": o, "category": int(rng.random() >= t[0])}
            for o, t in targets.items() for _ in range(100)]
    out = metrics.evaluate_version(rows, targets, 2, n_bootstrap=300, seed=r)
    inside += out["mae_floor_ci"][0] <= out["mae"] <= out["mae_floor_ci"][1]
    assert out["mae_floor_ci"][0] <= out["mae_floor"] <= out["mae_floor_ci"][1]
  assert inside >= 34, inside


def _calibrated_sampler_runs(shift, reps, rng, n_occ=14, rounds=100, n_bootstrap=300):
  """Evaluates ``reps`` simulated models whose true answer distribution is the target moved by
  ``shift`` (K = 2): -> (true MAE, list of evaluate_version outputs)."""
  target = rng.dirichlet(np.ones(2), n_occ)
  truth = np.clip(target + shift * np.array([1.0, -1.0]), 0.01, 0.99)
  truth /= truth.sum(-1, keepdims=True)
  targets = {f"occ{j}": target[j].tolist() for j in range(n_occ)}
  outs = []
  for r in range(reps):
    rows = [{"occupation": f"occ{j}", "category": int(c)}
            for j in range(n_occ) for c in rng.choice(2, size=rounds, p=truth[j])]
    outs.append(metrics.evaluate_version(rows, targets, 2, n_bootstrap=n_bootstrap, seed=r))
  return float(metrics.mae(target, truth).mean()), outs


@pytest.mark.parametrize("shift", [0.0, 0.03, 0.15])
def test_mae_interval_covers_the_true_mae_and_contains_its_estimate(shift):
  # A percentile interval of an absolute error sits above a small true MAE (metrics' docstring);
  # the basic interval with the floor rule covers it, and always holds its corrected estimate.
  true_mae, outs = _calibrated_sampler_runs(shift, 150, np.random.default_rng(int(shift * 100)))
  covered = np.mean([o["mae_ci"][0] <= true_mae <= o["mae_ci"][1] for o in outs])
  assert covered >= 0.8, (shift, true_mae, covered)
  for o in outs:
    assert o["mae_ci"][0] <= o["mae_corrected"] <= o["mae_ci"][1]
    assert 0.0 <= o["mae_ci"][0]


def test_degenerate_replicates_keep_the_corrected_estimate_inside():
  """Every answer unparsed: every replicate the same MAE; the corrected estimate stays inside its
  interval despite float rounding, and the report's plots draw it."""
  out = metrics.evaluate_version([{"occupation": o, "category": None} for o in TARGETS
                                  for _ in range(7)], TARGETS, 2, n_bootstrap=50)
  assert out["mae_ci"][0] <= out["mae_corrected"] <= out["mae_ci"][1]
  from distfair_jax.evaluation import report
  import io
  report.plot_summary({"v3": out, "v2": out}, io.BytesIO())
