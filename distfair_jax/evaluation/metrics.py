"""Distribution-matching metrics: per-occupation distributions, MAE, KL, JS, bootstrap intervals.

Pure numpy functions over arrays (shapes in docstrings; ``...`` = any leading axes, ``K`` =
number of categories), plus ``evaluate_version`` which turns the parsed rows of one test version
into the dict stored under that version in ``eval/metrics.json``.

Conventions (METHOD.md, "Evaluation"):
- achieved distribution of an occupation = counts of the parsed answers / number of parsed answers;
  unparsed answers are left out of the denominator, and an occupation whose answers are all
  unparsed gets an all-zero achieved vector (so its MAE is mean(target) = 1/K for a distribution);
- MAE per occupation = mean over categories of |target - achieved|; aggregated as the mean
  (the headline) and the population standard deviation over occupations;
- KL(target || achieved) = sum over k with target_k > 0 of target_k * log(target_k / (achieved_k +
  1e-10)), natural log; aggregated as sum, mean and population standard deviation;
- Jensen-Shannon = (KL(t || m) + KL(a || m)) / 2 with m = (t + a) / 2, natural log (at most ln 2),
  0 log 0 = 0.

Bootstrap: each replicate resamples, within every occupation independently, its n rounds with
replacement (parsed and unparsed alike). The counts of a resample of n rounds drawn from an
empirical distribution over K categories + "unparsed" are exactly Multinomial(n, empirical
frequencies), so replicates are drawn as one vectorised ``Generator.multinomial`` call.

Intervals. An absolute error is biased upwards near zero: with the truth close to the target the
measured MAE exceeds |target - truth| by the sampling noise, and the bootstrap replicates (noise
added to noise) exceed the measured MAE again, so percentile intervals sit above their own estimate
(13 of 126 intervals of an earlier README table excluded it) and almost never cover a small true
MAE. The MAE, KL and JS intervals here are therefore *basic* (bias-corrected) bootstrap intervals
for the true value, [2 est - q97.5, 2 est - q2.5] clipped at 0, reported with the bias-corrected
estimate they contain by construction, ``2 est - mean(replicates)`` clipped at 0 (``mae_corrected``,
``kl_corrected``, ``js_corrected``); the plain estimate stays the headline (the paper's figure).
For the mean MAE the interval also reaches 0 whenever the measured MAE is within the 95 % range of
``mae_floor`` (below): a perfect match cannot be rejected at this sample size, so 0 is in the
confidence set. ``tests/test_metrics.py`` checks coverage on a simulated sampler at known
distances from the target (0 to 0.12 MAE): 0.82-0.97, against 0.00-0.96 for percentile intervals.
The per-category achieved frequencies (unbiased) keep percentile intervals. ``mae_floor`` gives the
MAE that a model whose answers follow the targets exactly would show on average with the same
numbers of parsed answers (and ``mae_floor_ci`` its 95 % range).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from distfair_jax.errors import InputError

__all__ = [
    "KL_EPS", "category_counts", "achieved_distribution", "mae", "kl_divergence", "js_divergence",
    "aggregate", "bootstrap_counts", "basic_interval", "bootstrap_intervals", "mae_floor", "exact_mae",
    "evaluate_version",
]

KL_EPS = 1e-10
CI_LEVEL = 0.95


# ---------------------------------------------------------------------------------------------------
# Per-occupation distributions


def category_counts(categories: Iterable[int | None], num_categories: int) -> tuple[np.ndarray, int]:
  """Counts parsed categories.

  Args:
    categories: parsed category indices, None for unparsed answers.
    num_categories: K.
  Returns:
    (counts [K] int64, number of unparsed answers).
  """
  counts = np.zeros(num_categories, np.int64)
  unparsed = 0
  for c in categories:
    if c is None:
      unparsed += 1
    else:
      counts[int(c)] += 1
  return counts, unparsed


def achieved_distribution(counts: np.ndarray) -> np.ndarray:
  """counts [..., K] -> achieved distribution [..., K] (float64); all-zero rows stay all zero."""
  counts = np.asarray(counts, np.float64)
  total = counts.sum(-1, keepdims=True)
  return np.divide(counts, total, out=np.zeros_like(counts), where=total > 0)


# ---------------------------------------------------------------------------------------------------
# Divergences (broadcast over leading axes)


def mae(target: np.ndarray, achieved: np.ndarray) -> np.ndarray:
  """Mean absolute error over categories: target [..., K], achieved [..., K] -> [...]."""
  return np.abs(np.asarray(target, np.float64) - np.asarray(achieved, np.float64)).mean(-1)


def kl_divergence(target: np.ndarray, achieved: np.ndarray, eps: float = KL_EPS) -> np.ndarray:
  """KL(target || achieved) in nats, skipping target zeros: [..., K], [..., K] -> [...]."""
  t = np.asarray(target, np.float64)
  a = np.asarray(achieved, np.float64)
  safe_t = np.where(t > 0, t, 1.0)
  terms = np.where(t > 0, t * (np.log(safe_t) - np.log(a + eps)), 0.0)
  return terms.sum(-1)


def _xlogy_ratio(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """x * log(x / y) elementwise with 0 log 0 = 0 (y > 0 wherever x > 0)."""
  safe_x = np.where(x > 0, x, 1.0)
  safe_y = np.where(x > 0, y, 1.0)
  return np.where(x > 0, x * (np.log(safe_x) - np.log(safe_y)), 0.0)


def js_divergence(target: np.ndarray, achieved: np.ndarray) -> np.ndarray:
  """Jensen-Shannon divergence in nats (0 .. ln 2 for distributions): [..., K], [..., K] -> [...]."""
  t = np.asarray(target, np.float64)
  a = np.asarray(achieved, np.float64)
  m = 0.5 * (t + a)
  return 0.5 * (_xlogy_ratio(t, m).sum(-1) + _xlogy_ratio(a, m).sum(-1))


def aggregate(values: np.ndarray) -> dict[str, float]:
  """Per-occupation values [n_occ] -> {'mean', 'std' (population), 'sum'}."""
  v = np.asarray(values, np.float64)
  return {"mean": float(v.mean()), "std": float(v.std()), "sum": float(v.sum())}


def exact_mae(target: np.ndarray, exact: np.ndarray) -> tuple[np.ndarray, float, float]:
  """MAE of exact steering distributions (no sampling).

  Args:
    target: [n_occ, K] target distributions.
    exact: [n_occ, K] the model's exact steering-token distributions.
  Returns:
    (per-occupation MAE [n_occ], mean over occupations, population std over occupations).
  """
  t = np.asarray(target, np.float64)
  e = np.asarray(exact, np.float64)
  if t.shape != e.shape or t.ndim != 2:
    raise InputError(f"exact: expected an array of shape {t.shape}, got {e.shape}")
  per = mae(t, e)
  return per, float(per.mean()), float(per.std())


# ---------------------------------------------------------------------------------------------------
# Bootstrap


def bootstrap_counts(counts: np.ndarray, unparsed: np.ndarray, n_bootstrap: int,
                     rng: np.random.Generator) -> np.ndarray:
  """Resamples each occupation's rounds with replacement.

  Args:
    counts: [n_occ, K] parsed counts per occupation.
    unparsed: [n_occ] unparsed counts per occupation.
    n_bootstrap: B, number of replicates.
    rng: numpy Generator (the only source of randomness).
  Returns:
    [B, n_occ, K] resampled parsed counts (the unparsed column is dropped).
  """
  full = np.concatenate([np.asarray(counts, np.int64), np.asarray(unparsed, np.int64)[:, None]], -1)
  n = full.sum(-1)  # [n_occ]
  freq = full / np.maximum(n, 1)[:, None]
  freq[n == 0, -1] = 1.0  # an occupation without rows stays empty in every replicate
  draws = rng.multinomial(n, freq, size=(n_bootstrap, full.shape[0]))  # [B, n_occ, K + 1]
  return draws[..., :-1]


def _interval(samples: np.ndarray, axis: int = 0) -> np.ndarray:
  """Percentile interval: [2, ...] (lo, hi) of ``samples`` along ``axis``."""
  alpha = (1.0 - CI_LEVEL) / 2
  return np.quantile(samples, [alpha, 1.0 - alpha], axis=axis)


def basic_interval(estimate: np.ndarray, replicates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Bias-corrected (basic) bootstrap interval of a non-negative statistic, and its estimate.

  Args:
    estimate: [...] the statistic on the data.
    replicates: [B, ...] the statistic on B bootstrap resamples.
  Returns:
    (interval [2, ...] = (max(0, 2 est - q_hi), max(0, 2 est - q_lo)),
     corrected estimate [...] = max(0, 2 est - mean(replicates)), inside the interval).
  """
  est = np.asarray(estimate, np.float64)
  lo, hi = _interval(replicates)
  interval = np.maximum(0.0, np.stack([2 * est - hi, 2 * est - lo]))
  corrected = np.maximum(0.0, 2 * est - np.asarray(replicates, np.float64).mean(0))
  # inside by construction (q_lo <= mean <= q_hi); clipped against float rounding when every
  # replicate is the same value (e.g. all answers unparsed)
  return interval, np.clip(corrected, interval[0], interval[1])


def bootstrap_intervals(target: np.ndarray, counts: np.ndarray, unparsed: np.ndarray, *,
                        n_bootstrap: int = 1000, seed: int = 0) -> dict[str, np.ndarray]:
  """95 % bootstrap intervals (see the module docstring: basic intervals for the errors,
  percentile intervals for the achieved frequencies).

  Args:
    target: [n_occ, K]; counts: [n_occ, K]; unparsed: [n_occ].
  Returns:
    dict of [2] arrays (lo, hi) for 'mae', 'kl', 'js' (means over occupations) with their
    corrected estimates 'mae_corrected', 'kl_corrected', 'js_corrected' (scalars), and per
    occupation 'achieved' [n_occ, K, 2] and 'occupation_mae' [n_occ, 2]. The 'mae' interval
    here has no floor rule (``evaluate_version`` adds it).
  """
  rng = np.random.default_rng(seed)
  boot = bootstrap_counts(counts, unparsed, n_bootstrap, rng)  # [B, n_occ, K]
  achieved = achieved_distribution(boot)
  t = np.asarray(target, np.float64)
  observed = achieved_distribution(counts)
  per_mae = mae(t[None], achieved)  # [B, n_occ]
  occ_mae = mae(t, observed)  # [n_occ]
  out: dict[str, np.ndarray] = {}
  for name, per_obs, per_boot in (
      ("mae", occ_mae, per_mae),
      ("kl", kl_divergence(t, observed), kl_divergence(t[None], achieved)),
      ("js", js_divergence(t, observed), js_divergence(t[None], achieved))):
    out[name], out[f"{name}_corrected"] = basic_interval(per_obs.mean(), per_boot.mean(-1))
  out["achieved"] = np.moveaxis(_interval(achieved), 0, -1)
  out["occupation_mae"] = np.moveaxis(basic_interval(occ_mae, per_mae)[0], 0, -1)
  return out


def mae_floor(target: np.ndarray, n_parsed: np.ndarray, *, n_bootstrap: int = 1000,
              seed: int = 0) -> tuple[float, np.ndarray]:
  """Sampling floor of the MAE: a model answering exactly from the targets, same parsed counts.

  Args:
    target: [n_occ, K] target distributions.
    n_parsed: [n_occ] parsed answers per occupation (an occupation with none keeps an all-zero
      achieved distribution, as in the measured MAE).
  Returns:
    (mean over replicates of the mean-over-occupations MAE, its 95 % range [2]).
  """
  t = np.asarray(target, np.float64)
  rng = np.random.default_rng([seed, 1])  # a stream independent of the bootstrap's
  p = t / t.sum(-1, keepdims=True)
  draws = rng.multinomial(np.asarray(n_parsed, np.int64), p, size=(n_bootstrap, t.shape[0]))
  values = mae(t[None], achieved_distribution(draws)).mean(-1)  # [B]
  return float(values.mean()), _interval(values)


# ---------------------------------------------------------------------------------------------------
# One test version -> metrics dict


def _floats(x: np.ndarray) -> list:
  return np.asarray(x, np.float64).tolist()


def _check_distribution(values: Any, k: int, where: str, *, at_most: bool = False) -> np.ndarray:
  """[k] non-negative probabilities summing to 1 (``at_most``: to at most 1), else InputError."""
  try:
    arr = np.asarray(values, np.float64)
  except (TypeError, ValueError):
    arr = None
  total_ok = (arr.sum() <= 1.0 + 1e-3 if at_most else abs(arr.sum() - 1.0) <= 1e-3
              ) if arr is not None and arr.shape == (k,) else False
  if not total_ok or not np.all(np.isfinite(arr)) or np.any(arr < 0):
    raise InputError(f"{where}: expected {k} non-negative probabilities summing to "
                     f"{'at most ' if at_most else ''}1, got {values!r}")
  return arr


def evaluate_version(rows: Iterable[Mapping[str, Any]], targets: Mapping[str, Sequence[float]],
                     num_categories: int, *, n_bootstrap: int = 1000, seed: int = 0,
                     exact: Mapping[str, Sequence[float]] | None = None,
                     answers: Mapping[str, Sequence[float]] | None = None,
                     categories: Sequence[str] | None = None,
                     source: str = "eval rows") -> dict[str, Any]:
  """Metrics of one test version, as stored under that version in ``eval/metrics.json``.

  Args:
    rows: dicts with ``occupation`` (str) and ``category`` (int in [0, K) or None = unparsed), as
      in ``eval/<version>.jsonl``; other fields are ignored.
    targets: occupation -> target distribution (K floats). Occupations are reported in this
      order; those with no rows are left out; a row whose occupation is missing here is an error.
    num_categories: K.
    n_bootstrap: bootstrap replicates for the 95 % intervals (0 = no intervals: fields are None).
    seed: seeds the numpy Generator of the bootstrap.
    exact: optional occupation -> exact steering distribution (K floats) from the logits; adds
      ``exact_mae``, ``exact_mae_std`` and per-occupation ``exact`` / ``exact_mae``.
    answers: optional occupation -> the exact probabilities of the K canonical answers (at most
      1 in all; ``evaluate.answer_distributions``); adds ``exact_answer_mae`` (against the
      answers renormalised over the K, the noise-free twin of ``mae``),
      ``exact_answer_mae_raw`` (not renormalised: the non-answer mass counts as error),
      ``non_answer`` (mean mass on anything else) and the per-occupation ``answer_probs`` /
      ``non_answer``.
    categories: optional category names, copied into the output for the report.
    source: names the rows' origin (e.g. the JSONL path) in error messages.

  Returns:
    A JSON-serialisable dict: mae, mae_std, mae_ci [lo, hi] with mae_corrected (the
    bias-corrected estimate inside it), mae_floor, mae_floor_ci (see the module docstring), kl
    (mean), kl_corrected, js_corrected, kl_sum, kl_std, kl_ci, js,
    js_std, js_ci, unparsed_rate, n_samples, n_unparsed, n_occupations, num_categories,
    n_bootstrap, seed, ci_level, (categories), (exact_mae, exact_mae_std), per_occupation: list of
    {occupation, target, achieved, achieved_ci [[lo, hi]] * K, counts, n, n_unparsed, mae, mae_ci,
    kl, js, (exact, exact_mae)}.

  Raises:
    InputError: a malformed row, target or exact distribution, or no rows at all.
  """
  k = _check_arguments(num_categories, categories, n_bootstrap, source)
  per_occ = _rows_by_occupation(rows, targets, k, source)
  names = [o for o in targets if o in per_occ]
  target = np.stack([_check_distribution(targets[o], k, f"{source}: targets[{o!r}]") for o in names])
  counts = np.zeros((len(names), k), np.int64)
  unparsed = np.zeros(len(names), np.int64)
  for j, o in enumerate(names):
    counts[j], unparsed[j] = category_counts(per_occ[o], k)
  achieved = achieved_distribution(counts)
  occ_mae = mae(target, achieved)
  occ_kl = kl_divergence(target, achieved)
  occ_js = js_divergence(target, achieved)

  ci = (bootstrap_intervals(target, counts, unparsed, n_bootstrap=n_bootstrap, seed=seed)
        if n_bootstrap > 0 else None)
  out = _summary(target, counts, unparsed, ci, occ_mae, occ_kl, occ_js, n_bootstrap, seed)
  if ci is not None and out["mae"] <= out["mae_floor_ci"][1]:
    out["mae_ci"][0] = 0.0  # a perfect match cannot be rejected: 0 is in the confidence set
  if categories is not None:
    out["categories"] = [str(c) for c in categories]

  exact_arr, per_exact = _add_exact_metrics(out, names, target, exact, k, source)
  out["per_occupation"] = [
      _occupation_entry(j, o, target, achieved, counts, unparsed, ci, occ_mae, occ_kl, occ_js,
                        exact_arr, per_exact) for j, o in enumerate(names)]
  if answers is not None:
    _add_answer_metrics(out, names, target, answers, k, source)
  return out


def _check_arguments(num_categories, categories, n_bootstrap: int, source: str) -> int:
  """K, after checking evaluate_version's arguments (one-line InputErrors naming ``source``)."""
  k = int(num_categories)
  if k < 1:
    raise InputError(f"{source}: num_categories: expected a positive integer, got {num_categories!r}")
  if categories is not None and len(categories) != k:
    raise InputError(f"{source}: categories: expected {k} names, got {list(categories)!r}")
  if n_bootstrap < 0:
    raise InputError(f"{source}: n_bootstrap: expected >= 0, got {n_bootstrap}")
  return k


def _add_exact_metrics(out: dict, names, target: np.ndarray, exact, k: int, source: str):
  """Adds ``exact_mae`` / ``exact_mae_std`` to ``out`` when ``exact`` is given; returns the exact
  distributions [occupations, K] and their per-occupation MAE (both None without ``exact``)."""
  exact_arr = per_exact = None
  if exact is not None:
    missing = [o for o in names if o not in exact]
    if missing:
      raise InputError(f"{source}: exact: expected a distribution for every occupation, "
                       f"missing {missing!r}")
    exact_arr = np.stack([_check_distribution(exact[o], k, f"{source}: exact[{o!r}]")
                          for o in names])
    per_exact, out["exact_mae"], out["exact_mae_std"] = exact_mae(target, exact_arr)
  return exact_arr, per_exact


def _add_answer_metrics(out: dict, names, target: np.ndarray, answers, k: int, source: str):
  """The exact answer-probability figures of ``evaluate_version`` (``answers`` given)."""
  missing = [o for o in names if o not in answers]
  if missing:
    raise InputError(f"{source}: answers: expected probabilities for every occupation, "
                     f"missing {missing!r}")
  q = np.stack([_check_distribution(answers[o], k, f"{source}: answers[{o!r}]", at_most=True)
                for o in names])
  mass = q.sum(-1)
  renorm = np.divide(q, mass[:, None], out=np.zeros_like(q), where=mass[:, None] > 0)
  per, per_raw = mae(target, renorm), mae(target, q)
  out["exact_answer_mae"], out["exact_answer_mae_raw"] = float(per.mean()), float(per_raw.mean())
  out["non_answer"] = float((1.0 - mass).mean())
  for entry, probs, left in zip(out["per_occupation"], q, 1.0 - mass):
    entry["answer_probs"], entry["non_answer"] = _floats(probs), float(left)


def _summary(target, counts, unparsed, ci, occ_mae, occ_kl, occ_js, n_bootstrap: int,
             seed: int) -> dict[str, Any]:
  """The version-level figures of ``evaluate_version`` (before the per-occupation table)."""
  m, kl, js = aggregate(occ_mae), aggregate(occ_kl), aggregate(occ_js)
  n_samples = int(counts.sum() + unparsed.sum())
  floor, floor_ci = (mae_floor(target, counts.sum(-1), n_bootstrap=n_bootstrap, seed=seed)
                     if n_bootstrap > 0 else (None, None))
  return {
      "mae": m["mean"], "mae_std": m["std"], "mae_ci": _floats(ci["mae"]) if ci else None,
      "mae_corrected": float(ci["mae_corrected"]) if ci else None,
      "kl_corrected": float(ci["kl_corrected"]) if ci else None,
      "js_corrected": float(ci["js_corrected"]) if ci else None,
      "mae_floor": floor, "mae_floor_ci": _floats(floor_ci) if ci else None,
      "kl": kl["mean"], "kl_sum": kl["sum"], "kl_std": kl["std"],
      "kl_ci": _floats(ci["kl"]) if ci else None,
      "js": js["mean"], "js_std": js["std"], "js_ci": _floats(ci["js"]) if ci else None,
      "unparsed_rate": float(unparsed.sum() / n_samples),
      "n_samples": n_samples, "n_unparsed": int(unparsed.sum()), "n_occupations": len(target),
      "num_categories": int(target.shape[1]), "n_bootstrap": int(n_bootstrap), "seed": int(seed),
      "ci_level": CI_LEVEL,
  }


def _rows_by_occupation(rows, targets, k: int, source: str) -> dict[str, list[int | None]]:
  """occupation -> the rows' categories (None: unparsed), checked."""
  per_occ: dict[str, list[int | None]] = {}
  for i, row in enumerate(rows):
    if not isinstance(row, Mapping):
      raise InputError(f"{source}: row {i}: expected an object, got {type(row).__name__}")
    occ = row.get("occupation")
    if not isinstance(occ, str):
      raise InputError(f"{source}: row {i}: occupation: expected a string, got {occ!r}")
    if occ not in targets:
      raise InputError(f"{source}: row {i}: occupation: expected one of the target occupations, "
                       f"got {occ!r}")
    cat = row.get("category")
    if cat is not None and (isinstance(cat, bool) or not isinstance(cat, (int, np.integer))
                            or not 0 <= int(cat) < k):
      raise InputError(f"{source}: row {i}: category: expected an integer in [0, {k}) or null, "
                       f"got {cat!r}")
    per_occ.setdefault(occ, []).append(None if cat is None else int(cat))
  if not per_occ:
    raise InputError(f"{source}: expected at least one row, got none")
  return per_occ


def _occupation_entry(j, o, target, achieved, counts, unparsed, ci, occ_mae, occ_kl, occ_js,
                      exact_arr, per_exact) -> dict[str, Any]:
  """The per_occupation entry of occupation ``o`` (row ``j`` of the arrays)."""
  entry: dict[str, Any] = {
      "occupation": o, "target": _floats(target[j]), "achieved": _floats(achieved[j]),
      "achieved_ci": _floats(ci["achieved"][j]) if ci else None,
      "counts": counts[j].tolist(), "n": int(counts[j].sum() + unparsed[j]),
      "n_unparsed": int(unparsed[j]), "mae": float(occ_mae[j]),
      "mae_ci": _floats(ci["occupation_mae"][j]) if ci else None,
      "kl": float(occ_kl[j]), "js": float(occ_js[j]),
  }
  if exact_arr is not None:
    entry["exact"] = _floats(exact_arr[j])
    entry["exact_mae"] = float(per_exact[j])
  return entry

