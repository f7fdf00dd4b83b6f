"""Several seeds' results as one: the means over the seeds with their standard deviations."""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from distfair_jax import fileio


SEED_FIELDS = ("mae", "mae_corrected", "mae_floor", "exact_answer_mae", "non_answer", "exact_mae",
               "unparsed_rate", "bare_answer_rate", "kl", "kl_sum", "z0_mean")


def aggregate_seeds(per_seed: dict[int, dict]) -> dict:
  """{seed: results} -> results of the same shape whose figures are the means over the seeds,
  with ``<field>_sd`` (the sample standard deviation over seeds), ``seeds`` and ``per_seed``
  (the seeds' own figures); a figure missing in any seed is left out."""
  seeds = sorted(per_seed)
  first = per_seed[seeds[0]]
  out: dict = {}
  for ds, methods in first.items():
    out[ds] = {}
    for method, versions in methods.items():
      out[ds][method] = {}
      for v in versions:
        runs = [per_seed[s][ds][method][v] for s in seeds]
        entry: dict[str, Any] = {"seeds": seeds, "per_seed": runs}
        for f in SEED_FIELDS:
          vals = [r.get(f) for r in runs]
          if all(isinstance(x, (int, float)) for x in vals):
            entry[f] = float(np.mean(vals))
            entry[f"{f}_sd"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
        out[ds][method][v] = entry
  return out


def aggregate_v2(run_dir: str, seeds: Sequence[int], name: str) -> dict:
  """A per-seed {dataset: {variant: v2 summary}} file (``decoding_sweep.json``,
  ``kl_pairs.json``) averaged over the seeds (``aggregate_seeds``)."""
  wrapped = {s: {ds: {key: {"v2": m} for key, m in rows.items()} for ds, rows in
                 fileio.read_json(os.path.join(run_dir, f"seed{s}", name)).items()}
             for s in seeds}
  return {ds: {key: m["v2"] for key, m in rows.items()}
          for ds, rows in aggregate_seeds(wrapped).items()}
