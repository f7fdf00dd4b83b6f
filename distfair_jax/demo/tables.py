"""The demo's tables (Markdown) and plots: one seed's results, several seeds' means and standard
deviations, the KL table and the analyses' sweeps; the comparison plot and each dataset's
per-occupation picture. Numbers, Markdown tables and figures come from the evaluation report's
helpers (``evaluation.report``: ``fmt``, ``fmt_ci``, ``markdown_table``, ``figure``)."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from distfair_jax import fileio
from distfair_jax.demo.settings import METHODS
from distfair_jax.evaluation.report import figure, fmt, fmt_ci, markdown_table


def _summary(m: dict) -> dict:
  out = {"mae": m["mae"], "mae_ci": m.get("mae_ci"), "mae_corrected": m.get("mae_corrected"),
         "unparsed_rate": m.get("unparsed_rate"), "exact_answer_mae": m.get("exact_answer_mae"),
         "non_answer": m.get("non_answer"),
         "kl": m.get("kl"), "kl_sum": m.get("kl_sum"), "kl_std": m.get("kl_std"),
         "exact_mae": m.get("exact_mae")}
  if "bare_answer_rate" in m:  # story versions
    out["bare_answer_rate"] = m["bare_answer_rate"]
  if "mae_floor" in m:
    out["mae_floor"] = m["mae_floor"]
  return out


def _method_rows(results: dict):
  """(dataset, method, its results) in ``METHODS`` order, for the methods a dataset has."""
  for ds, methods in results.items():
    for method in METHODS:
      if method in methods:
        yield ds, method, methods[method]


def _head(versions: Sequence[str], mae: str) -> list[str]:
  """The results and seeds tables' columns; ``mae``: what follows "<version> MAE"."""
  exact = [v for v in versions if v != "v3"]  # stories have no canonical answers
  return (["dataset", "method"] + [f"{v} MAE{mae}" for v in versions]
          + [f"{v} exact answer MAE" for v in exact] + ["v2 non-answer", "v2 exact steering MAE"]
          + [f"{v} unparsed" for v in versions] + [f"{v} bare answers" for v in _stories(versions)])


def _stories(versions: Sequence[str]) -> list[str]:
  """The story versions asked for (their bare-answer rate gets a column)."""
  return [v for v in versions if v == "v3"]


def _mae_cell(m: dict | None) -> str:
  """A version's MAE and, in brackets, its bias-corrected estimate with the 95% interval."""
  if m is None:
    return ""
  ci, corrected = m.get("mae_ci"), m.get("mae_corrected")
  return fmt(m["mae"]) + (f" ({fmt(corrected)} {fmt_ci(ci)})" if ci and corrected is not None
                          else "")


def results_table(results: dict, versions: Sequence[str]) -> str:
  """Markdown: one row per (dataset, method), per version the MAE and, in brackets, the
  bias-corrected estimate with its 95% interval (metrics' docstring); exact MAE, unparsed rate."""
  exact = [v for v in versions if v != "v3"]
  rows = []
  for ds, method, m in _method_rows(results):
    e = [(m.get(v) or {}).get("exact_answer_mae") for v in exact]
    v2 = m.get("v2") or {}
    rates = [(m.get(v) or {}).get("unparsed_rate") for v in versions]
    rows.append([ds, method] + [_mae_cell(m.get(v)) for v in versions]
                + ["" if x is None else fmt(x) for x in e]
                + ["" if v2.get("non_answer") is None else f"{v2['non_answer']:.1%}",
                   "" if v2.get("exact_mae") is None else fmt(v2["exact_mae"])]
                + ["" if r is None else f"{r:.1%}" for r in rates]
                + ["" if (m.get(v) or {}).get("bare_answer_rate") is None
                   else f"{m[v]['bare_answer_rate']:.1%}" for v in _stories(versions)])
  return "\n".join(markdown_table(_head(versions, " (corrected [95% CI])"), rows)) + "\n"


TRAINED = ("ift", "dpo", "ours")  # the headline's story columns: the fine-tuned methods


def headline_table(results: dict) -> str:
  """Markdown, one row per dataset: each method's v2 exact answer MAE (non-answer mass counted
  as error; the mean over seeds for several), whether ours is below IFT's and DPO's (the paper's
  claim), and the fine-tuned methods' v3 stories that failed (unparsed + bare answers)."""
  methods = [m for m in METHODS if any(m in ms for ms in results.values())]
  trained = [m for m in TRAINED if m in methods]

  def exact(ms: dict, method: str) -> float | None:
    return ((ms.get(method) or {}).get("v2") or {}).get("exact_answer_mae")

  def failed(ms: dict, method: str) -> str:
    v3 = (ms.get(method) or {}).get("v3") or {}
    if v3.get("unparsed_rate") is None:
      return ""
    return f"{v3['unparsed_rate'] + v3.get('bare_answer_rate', 0.0):.1%}"

  rows = []
  for ds, ms in results.items():
    ours, rivals = exact(ms, "ours"), [exact(ms, m) for m in ("ift", "dpo")]
    below = ("" if ours is None or None in rivals else
             "yes" if all(ours < r for r in rivals) else "no")
    rows.append([ds] + ["" if exact(ms, m) is None else fmt(exact(ms, m)) for m in methods]
                + [below] + [failed(ms, m) for m in trained])
  head = (["dataset"] + [f"{m} v2 exact answer MAE" for m in methods]
          + ["ours below IFT and DPO"] + [f"{m} v3 failed" for m in trained])
  return "\n".join(markdown_table(head, rows)) + "\n"


def sweep_table(sweeps: dict[str, dict], label: str = "decoding") -> str:
  """Markdown: ours on v2 under each decoding configuration of ``DECODING_SWEEP`` (or each
  variant of ``Demo.kl_pairs_variant``, ``label`` naming the column)."""
  def cell(m: dict, f: str, pct: bool = False) -> str:
    if m.get(f) is None:
      return ""
    text = f"{100 * m[f]:.1f}%" if pct else f"{m[f]:.3f}"
    if f"{f}_sd" in m:  # several seeds: mean ± sd
      text += f" ± {100 * m[f + '_sd']:.1f}" if pct else f" ± {m[f + '_sd']:.3f}"
    return text

  z0 = any("z0_mean" in m for rows in sweeps.values() for m in rows.values())
  head = (["dataset", label, "v2 MAE", "exact answer MAE", "non-answer", "unparsed"]
          + ["mean z0 in training"] * z0)
  rows = [[ds, key, cell(m, "mae"), cell(m, "exact_answer_mae"), cell(m, "non_answer", True),
           cell(m, "unparsed_rate", True)] + [cell(m, "z0_mean")] * z0
          for ds, sweep in sweeps.items() for key, m in sweep.items()]
  return "\n".join(markdown_table(head, rows)) + "\n"


def timings_table(timings: dict[str, dict[str, float]]) -> str:
  """Markdown: each dataset's wall time (seconds, as ``Demo._timed`` recorded it, over every
  sitting of a resumed run): training (every run of the grids and its held-out scoring for the
  selection; stages stopped and not yet resumed included), evaluation, and the total in
  minutes."""
  rows = []
  for ds, times in timings.items():
    train = sum(t for k, t in times.items() if not k.startswith("eval:"))
    evaluation = sum(t for k, t in times.items() if k.startswith("eval:"))
    rows.append([ds, f"{train:.0f}", f"{evaluation:.0f}", f"{(train + evaluation) / 60:.1f}"])
  return "\n".join(markdown_table(["dataset", "training (s)", "evaluation (s)", "total (min)"],
                                  rows)) + "\n"


def kl_table(results: dict, versions: Sequence[str]) -> str:
  """Markdown: the paper's KL table, KL(target || achieved) in nats per version, the sum and mean
  over occupations (with their std over occupations for one seed; mean ± sd over seeds for
  several)."""
  def cell(m: dict | None) -> str:
    if not m or m.get("kl") is None:
      return ""
    if "kl_sd" in m:
      return f"{m['kl_sum']:.2f} ± {m['kl_sum_sd']:.2f} / {m['kl']:.3f} ± {m['kl_sd']:.3f}"
    return f"{m['kl_sum']:.2f} / {m['kl']:.3f} ({m['kl_std']:.3f})"

  several = any("kl_sd" in (v or {}) for ms in results.values() for m in ms.values()
                for v in m.values())
  how = "sum / mean, each mean ± sd over seeds" if several else "sum / mean (std over occupations)"
  head = ["dataset", "method"] + [f"{v} KL {how}" for v in versions]
  rows = [[ds, method] + [cell(m.get(v)) for v in versions]
          for ds, method, m in _method_rows(results)]
  return "\n".join(markdown_table(head, rows)) + "\n"


def comparison_plot(results: dict, versions: Sequence[str], path: str) -> None:
  """Bar chart of MAE per method and version, one panel per dataset: with several seeds the mean
  with ± one standard deviation over seeds; with one seed the MAE, and the bias-corrected
  estimate with its 95% interval as a point with error bars."""
  datasets = list(results)
  fig = figure(max(7.0, 1.2 * len(METHODS) * len(versions) / 2), 3.2 * len(datasets))
  for i, ds in enumerate(datasets):
    ax = fig.add_subplot(len(datasets), 1, i + 1)
    width = 0.8 / len(versions)
    for j, v in enumerate(versions):
      xs, ys, centres, lo, hi = [], [], [], [], []
      for m_i, method in enumerate(METHODS):
        m = results[ds].get(method, {}).get(v)
        if m is None:
          continue
        xs.append(m_i + (j - (len(versions) - 1) / 2) * width)
        ys.append(m["mae"])
        if "mae_sd" in m:
          centre, low, high = m["mae"], m["mae"] - m["mae_sd"], m["mae"] + m["mae_sd"]
        elif m.get("mae_ci") and m.get("mae_corrected") is not None:
          centre, (low, high) = m["mae_corrected"], m["mae_ci"]
        else:
          centre = low = high = m["mae"]
        centres.append(centre)
        lo.append(max(0.0, centre - low))
        hi.append(max(0.0, high - centre))
      bars = ax.bar(xs, ys, width, label=v)
      ax.errorbar(xs, centres, yerr=[lo, hi], fmt="o", markersize=2, capsize=2,
                  color=bars.patches[0].get_facecolor() if bars.patches else "k", ecolor="k")
    ax.set_xticks(range(len(METHODS)), METHODS, rotation=20, fontsize=8)
    ax.set_ylabel("MAE")
    ax.set_title(f"{ds}: mean absolute error to the target distribution (lower is better)", fontsize=9)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def seeds_table(results: dict, versions: Sequence[str]) -> str:
  """Markdown of ``aggregate_seeds`` results: mean ± sd over the seeds, per version the sampled
  MAE, v2's floor (the sampled MAE of a perfect match, ``metrics.mae_floor``: how close sampling
  can come), then v2's exact answer MAE, non-answer mass and exact steering MAE, and each
  version's unparsed rate."""
  def cell(m: dict | None, f: str, pct: bool = False) -> str:
    if not m or f not in m:
      return ""
    mean, sd = m[f], m[f"{f}_sd"]
    return f"{100 * mean:.1f}% ± {100 * sd:.1f}" if pct else f"{mean:.3f} ± {sd:.3f}"

  n = len(next(iter(next(iter(next(iter(results.values())).values())).values()))["seeds"])
  exact = [v for v in versions if v != "v3"]
  floor = ["v2"] if "v2" in versions else []
  rows = [[ds, method] + [cell(m.get(v), "mae") for v in versions]
          + [cell(m.get(v), "mae_floor") for v in floor]
          + [cell(m.get(v), "exact_answer_mae") for v in exact]
          + [cell(m.get("v2"), "non_answer", True), cell(m.get("v2"), "exact_mae")]
          + [cell(m.get(v), "unparsed_rate", True) for v in versions]
          + [cell(m.get(v), "bare_answer_rate", True) for v in _stories(versions)]
          for ds, method, m in _method_rows(results)]
  head = _head(versions, "")
  head[2 + len(versions):2 + len(versions)] = [f"{v} MAE floor" for v in floor]
  lines = [f"Mean ± standard deviation over {n} seeds.", ""] + markdown_table(head, rows)
  return "\n".join(lines) + "\n"


def occupation_plot(dataset_dir: str, methods: Sequence[str], version: str, path: str) -> bool:
  """Per occupation, each method's exact answer distribution on ``version`` (the canonical
  answers' probabilities renormalised; else its exact steering distribution; else its sampled
  shares) against the target: one panel per category (one in all for two), occupations by their
  target share of the first category. Reads
  ``dataset_dir/<method>/eval/metrics.json``; False (nothing written) when none has ``version``."""
  rows = {}
  for method in methods:
    doc = os.path.join(dataset_dir, method, "eval", "metrics.json")
    v = fileio.read_json(doc).get("versions", {}).get(version) if os.path.exists(doc) else None
    if v is not None:
      rows[method] = {o["occupation"]: o for o in v["per_occupation"]}
  if not rows:
    return False
  first = next(iter(rows.values()))
  order = sorted(first, key=lambda o: -first[o]["target"][0])
  categories = next(iter(fileio.read_json(os.path.join(dataset_dir, m, "eval", "metrics.json"))
                         ["versions"][version].get("categories") or [] for m in rows))
  k = len(first[order[0]]["target"])
  panels = 1 if k == 2 else k
  fig = figure(max(7.0, 0.45 * len(order)), 1.0 + 2.6 * panels)
  x = np.arange(len(order))
  for c in range(panels):
    ax = fig.add_subplot(panels, 1, c + 1)
    ax.plot(x, [first[o]["target"][c] for o in order], "k_", markersize=14, mew=2, label="target")
    for method, occ in rows.items():
      shares = []
      for o in order:
        entry = occ[o]
        probs = np.asarray(entry.get("answer_probs") or entry.get("exact") or entry["achieved"],
                           np.float64)
        shares.append(probs[c] / probs.sum() if probs.sum() > 0 else np.nan)
      ax.plot(x, shares, "o-" if method == "ours" else ".--", markersize=5 if method == "ours"
              else 4, linewidth=1.5 if method == "ours" else 0.8, label=method)
    name = categories[c] if c < len(categories) else str(c)
    ax.set_ylabel(f"P({name})")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xticks(x, [o[:28] for o in order] if c == panels - 1 else [], rotation=60, ha="right",
                  fontsize=7)
    if c == 0:
      ax.set_title(f"{os.path.basename(dataset_dir)}, {version}: each method's exact answer "
                   f"distribution per occupation against the target", fontsize=9)
      ax.legend(fontsize=7, ncol=4)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return True
