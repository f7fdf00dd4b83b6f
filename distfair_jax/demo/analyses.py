"""The paper's further analyses of one dataset's trained methods: out of distribution (another
region's prompts), KTO's mismatched pairs (``hybrid.kl_pairs``) and the decoding configuration.
Each takes the dataset's ``Demo`` after ``Demo.run``."""

from __future__ import annotations

import os

import numpy as np

from distfair_jax import console, fileio
from distfair_jax.data import build as build_lib
from distfair_jax.demo.tables import _summary

# The paper's out-of-distribution test: models trained on one region, evaluated on another's.
OUT_OF_DISTRIBUTION = {"gender_real_uk": "gender_real_us"}
# The decoding configurations ours is also evaluated with (temperature, top_p).
DECODING_SWEEP = ((0.5, 1.0), (1.0, 1.0), (1.5, 1.0), (1.0, 0.9))


def out_of_distribution(demo) -> dict[str, dict]:
  """Models trained here, tested on another region's prompts with that region's targets (the
  paper's OOD test: trained on gender_real_uk, evaluated on gender_real_us); {} where the
  dataset has no such pair. -> {"<dataset>_on_<other>": {method: {version: summary}}}."""
  other = OUT_OF_DISTRIBUTION.get(demo.dataset)
  if other is None:
    return {}
  data = build_lib.build_dataset(other, rows_per_occupation=1, test_rounds=demo.s.rounds,
                                 seed=demo.seed)
  tests = {v: data.records[f"test_{v}"] for v in demo.s.versions}
  out = {}
  for method in demo.methods:
    console.log(f"[{demo.dataset}] evaluating {method} on {other} (out of distribution)")
    doc = demo.evaluate_method(method, demo.trained[method], name=f"{method}_on_{other}",
                               tests=tests)
    out[method] = {v: _summary(m) for v, m in doc["versions"].items()}
  return {f"{demo.dataset}_on_{other}": out}


def kl_pairs_variant(demo) -> dict[str, dict]:
  """How much ``hybrid.kl_pairs`` moves ours: stage 2 retrained with ``kl_pairs: reference``
  (the original's interleaved pairs) at ours' selected rate, from the same SFT, evaluated on v2
  beside ours (``shifted``): {"kl_pairs: shifted" | "kl_pairs: reference": v2 summary}."""
  lr = demo.selection["ours"]["lr"]
  sft_dir = os.path.join(demo.dir, "runs", f"sft_lr{demo.selection['sft']['lr']:g}")
  console.log(f"[{demo.dataset}] ours with hybrid.kl_pairs: reference, lr {lr:g}")
  _, run, _ = demo.train_candidates("ours_klref", ["sft", "hybrid"], [lr], init_from=sft_dir,
                                    steered=True, kl_pairs="reference")
  out = {}
  for key, name, trained in (("kl_pairs: shifted", "ours", demo.trained["ours"]),
                             ("kl_pairs: reference", "ours_kl_pairs_reference", run)):
    doc = demo.evaluate_method("ours", trained, name=name, versions=["v2"])
    out[key] = {**_summary(doc["versions"]["v2"]), "z0_mean": _mean_z0(trained)}
  return out


def decoding_sweep(demo) -> dict[str, dict]:
  """Ours on v2 under other decoding configurations: {"T=..., top_p=...": summary}."""
  out = {}
  for t, p in DECODING_SWEEP:
    key = f"T={t:g}, top_p={p:g}"
    doc = demo.evaluate_method("ours", demo.trained["ours"], name=f"ours_T{t:g}_p{p:g}",
                               versions=["v2"], temperature=t, top_p=p)
    out[key] = _summary(doc["versions"]["v2"])
  return out


def _mean_z0(run: str) -> float | None:
  """The mean over logged training steps of KTO's reference point z0 (the ``kl`` metric) in a
  run's hybrid stage: where it is 0 throughout (clamped: max(0, mismatched reward)), the
  mismatched pairs, hence ``kl_pairs``, cannot change the training."""
  path = os.path.join(run, "metrics.jsonl")
  if not os.path.exists(path):
    return None
  z0 = [row["kl"] for _, row in fileio.read_jsonl(path)
        if row.get("stage") == "hybrid" and row.get("split", "train") == "train" and "kl" in row]
  return float(np.mean(z0)) if z0 else None


# ------------------------------------------------------------------------------------------------
# Tables and plots
