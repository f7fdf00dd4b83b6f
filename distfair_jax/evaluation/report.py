"""Evaluation report of a run: ``eval/metrics.json``, ``eval/report.md`` and PNG plots.

Layout in the run directory::

  eval/metrics.json          {"format": "distfair-metrics", "format_version": 1, "meta": {...},
                              "versions": {"v1": <metrics.evaluate_version output>, ...}}
  eval/report.md             summary table over versions, then one table per version
  eval/plots/<version>.png   target vs achieved (95 % bootstrap error bars) per occupation, one panel
                             per category; the exact steering distribution too where available
  eval/plots/summary.png     MAE per version with its interval

``metrics.json`` is the source of truth; ``report.md`` and the plots are derived from it and
``rebuild_report(run_dir)`` (``distfair report RUN``) regenerates them. ``meta`` records how the
samples were made (decoding configuration, steering mode, judge, ...) and is shown in the report.

Everything is rendered in memory first, then each file is written atomically (``fileio``), so a
failure never leaves a half-written report. Plots use matplotlib's Agg canvas (no pyplot, no global
backend change). ``fmt`` / ``fmt_ci`` (numbers), ``markdown_table`` and ``figure`` are shared with
the demo's tables and plots (``demo.tables``).
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from collections.abc import Mapping
from distfair_jax.fileio import Path
from typing import Any, Sequence

from distfair_jax import fileio
from distfair_jax.errors import InputError

__all__ = [
    "METRICS_FORMAT", "metrics_path", "load_metrics", "write_report", "write_eval_files",
    "rebuild_report", "render_markdown", "plot_version", "plot_summary", "fmt", "fmt_ci",
    "markdown_table", "figure",
]

METRICS_FORMAT = "distfair-metrics"
METRICS_FORMAT_VERSION = 1
_VERSION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_RESERVED = {"summary"}
_REQUIRED = ("mae", "mae_std", "kl", "js", "unparsed_rate", "n_samples", "per_occupation")
_REQUIRED_OCC = ("occupation", "target", "achieved", "mae", "n", "n_unparsed")


def metrics_path(run_dir: str | os.PathLike) -> Path:
  return fileio.as_path(run_dir) / "eval" / "metrics.json"


# ---------------------------------------------------------------------------------------------------
# metrics.json


def _validate(doc: Any, where: str) -> dict:
  if not isinstance(doc, Mapping):
    raise InputError(f"{where}: expected a JSON object, got {type(doc).__name__}")
  versions = doc.get("versions")
  if not isinstance(versions, Mapping) or not versions:
    raise InputError(f"{where}: versions: expected an object of test versions, got {versions!r}")
  for name, v in versions.items():
    if not isinstance(name, str) or not _VERSION_NAME.match(name) or name in _RESERVED:
      raise InputError(f"{where}: versions: expected names of letters, digits, '_', '.', '-' "
                       f"(not {sorted(_RESERVED)}), got {name!r}")
    if not isinstance(v, Mapping):
      raise InputError(f"{where}: versions.{name}: expected an object, got {type(v).__name__}")
    for field in _REQUIRED:
      if field not in v:
        raise InputError(f"{where}: versions.{name}.{field}: expected a value, got nothing")
    occs = v["per_occupation"]
    if not isinstance(occs, list) or not occs:
      raise InputError(f"{where}: versions.{name}.per_occupation: expected a non-empty list, "
                       f"got {occs!r}")
    k = None
    for i, occ in enumerate(occs):
      if not isinstance(occ, Mapping):
        raise InputError(f"{where}: versions.{name}.per_occupation[{i}]: expected an object")
      for field in _REQUIRED_OCC:
        if field not in occ:
          raise InputError(f"{where}: versions.{name}.per_occupation[{i}].{field}: expected a "
                           f"value, got nothing")
      for field in ("target", "achieved"):
        vec = occ[field]
        if (not isinstance(vec, list) or not vec or (k is not None and len(vec) != k)
            or not all(isinstance(x, (int, float)) for x in vec)):
          raise InputError(f"{where}: versions.{name}.per_occupation[{i}].{field}: expected "
                           f"{k or 'K'} numbers, got {vec!r}")
        k = len(vec)
  meta = doc.get("meta", {})
  if meta is not None and not isinstance(meta, Mapping):
    raise InputError(f"{where}: meta: expected an object, got {type(meta).__name__}")
  return dict(doc)


def load_metrics(run_dir: str | os.PathLike) -> dict:
  """Reads and validates ``RUN/eval/metrics.json``."""
  path = metrics_path(run_dir)
  if not path.is_file():
    raise InputError(f"{path}: expected the metrics of an evaluated run (run `distfair eval` "
                     f"first), got no such file")
  try:
    doc = json.loads(path.read_text(encoding="utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise InputError(f"{path}: expected JSON, got a parse error: {e}") from None
  return _validate(doc, str(path))


def _document(versions: Mapping[str, Mapping], meta: Mapping | None) -> dict:
  return {"format": METRICS_FORMAT, "format_version": METRICS_FORMAT_VERSION,
          "meta": dict(meta or {}), "versions": {k: dict(v) for k, v in versions.items()}}


def _render(doc: Mapping, plots: bool) -> dict[str, str | bytes]:
  """report.md and the plots of a metrics document, in memory: {name relative to eval/: content}."""
  files: dict[str, str | bytes] = {"report.md": render_markdown(doc, plots=plots)}
  if plots:
    for name, v in doc["versions"].items():
      files[f"plots/{name}.png"] = _png(lambda buf: plot_version(name, v, buf))
    files["plots/summary.png"] = _png(lambda buf: plot_summary(doc["versions"], buf))
    for name, v in doc["versions"].items():
      if belief_points(v) is not None:
        files[f"plots/belief_{name}.png"] = _png(lambda buf, n=name, v=v: plot_belief(n, v, buf))
  return files


def _png(draw) -> bytes:
  buf = io.BytesIO()
  draw(buf)
  return buf.getvalue()


def _write(eval_dir, files: Mapping[str, str | bytes]) -> dict[str, Path]:
  """Writes each file atomically; everything was rendered before the first write."""
  out = {}
  for rel, content in files.items():
    path = fileio.as_path(eval_dir) / rel
    if isinstance(content, bytes):
      fileio.write_bytes(path, content)
    else:
      fileio.write_text(path, content)
    out[rel] = path
  return out


def write_eval_files(eval_dir, versions: Mapping[str, Mapping], *, meta: Mapping | None = None,
                     plots: bool = True) -> dict[str, Path]:
  """Writes metrics.json, report.md and the plots into ``eval_dir`` (replacing those files)."""
  doc = _validate(_document(versions, meta), str(fileio.as_path(eval_dir) / "metrics.json"))
  try:
    text = json.dumps(doc, indent=2, allow_nan=False)
  except ValueError as e:
    raise InputError(f"{fileio.as_path(eval_dir) / 'metrics.json'}: expected finite numbers "
                     f"only, got {e}") from None
  return _write(eval_dir, {"metrics.json": text + "\n", **_render(doc, plots)})


def write_report(run_dir: str | os.PathLike, versions: Mapping[str, Mapping], *,
                 meta: Mapping | None = None, overwrite: bool = False,
                 plots: bool = True) -> dict[str, Path]:
  """Writes metrics.json, report.md and the plots of a run; returns {relative name: path}.

  Args:
    run_dir: the run directory (files go under ``run_dir/eval``).
    versions: test version name -> ``metrics.evaluate_version`` output.
    meta: how the samples were made (decoding config, steering mode, judge, ...), JSON-serialisable.
    overwrite: replace an existing ``eval/metrics.json`` (otherwise an InputError).
    plots: also draw the PNG plots.
  """
  path = metrics_path(run_dir)
  if path.exists() and not overwrite:
    raise InputError(f"{path}: expected no previous metrics, got an existing file "
                     f"(pass --overwrite to replace it)")
  return write_eval_files(path.parent, versions, meta=meta, plots=plots)


def rebuild_report(run_dir: str | os.PathLike, *, plots: bool = True) -> dict[str, Path]:
  """Regenerates ``report.md`` and the plots from ``RUN/eval/metrics.json`` (left untouched)."""
  doc = load_metrics(run_dir)
  return _write(metrics_path(run_dir).parent, _render(doc, plots))


# ---------------------------------------------------------------------------------------------------
# Markdown


def fmt(x: Any, digits: int = 3) -> str:
  """``x`` with ``digits`` decimals; "-" for None or a non-finite float."""
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return "-"
  return f"{x:.{digits}f}"


def fmt_ci(ci: Any, digits: int = 3) -> str:
  """An interval as "[lo, hi]" (``fmt``); "-" for none."""
  if not ci:
    return "-"
  return f"[{fmt(ci[0], digits)}, {fmt(ci[1], digits)}]"


def _cell(text: Any) -> str:
  return str(text).replace("|", "\\|").replace("\n", " ")


def _categories(v: Mapping) -> list[str]:
  k = len(v["per_occupation"][0]["target"])
  names = v.get("categories")
  return [str(c) for c in names] if names and len(names) == k else [str(i) for i in range(k)]


def markdown_table(header: Sequence[Any], rows: Sequence[Sequence[Any]]) -> list[str]:
  """A Markdown table's lines: the header, its rule, one line per row (cells escaped)."""
  lines = ["| " + " | ".join(_cell(h) for h in header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
  return lines


def render_markdown(doc: Mapping, *, plots: bool = True) -> str:
  """The text of ``report.md`` for a metrics document (as stored in metrics.json)."""
  versions: Mapping[str, Mapping] = doc["versions"]
  lines = ["# Evaluation report", ""]
  meta = doc.get("meta") or {}
  if meta:
    lines += ["## Setup", ""]
    for key, value in meta.items():
      shown = json.dumps(value, sort_keys=True) if isinstance(value, (Mapping, list)) else value
      lines.append(f"- **{_cell(key)}**: {_cell(shown)}")
    lines.append("")
  any_exact = any("exact_mae" in v for v in versions.values())
  any_answers = any("exact_answer_mae" in v for v in versions.values())
  any_bare = any("bare_answer_rate" in v for v in versions.values())
  header = (["version", "MAE", "MAE std", "corrected MAE [95% CI]", "MAE floor", "KL mean",
             "KL sum", "KL std", "JS", "unparsed", "samples"]
            + (["exact steering MAE"] if any_exact else [])
            + (["exact answer MAE", "non-answer"] if any_answers else [])
            + (["bare answers"] if any_bare else []))
  rows = []
  for name, v in versions.items():
    floor = (f"{fmt(v['mae_floor'])} {fmt_ci(v.get('mae_floor_ci'))}"
             if v.get("mae_floor") is not None else "-")
    corrected = (f"{fmt(v['mae_corrected'])} {fmt_ci(v.get('mae_ci'))}"
                 if v.get("mae_corrected") is not None else fmt_ci(v.get("mae_ci")))
    row = [name, fmt(v["mae"]), fmt(v["mae_std"]), corrected, floor, fmt(v["kl"]),
           fmt(v.get("kl_sum")), fmt(v.get("kl_std")), fmt(v["js"]),
           f"{v.get('n_unparsed', '-')} ({100 * v['unparsed_rate']:.1f}%)", v["n_samples"]]
    if any_exact:
      row.append(fmt(v.get("exact_mae")))
    if any_answers:
      row += [fmt(v.get("exact_answer_mae")),
              f"{100 * v['non_answer']:.1f}%" if v.get("non_answer") is not None else "-"]
    if any_bare:
      row.append(f"{100 * v['bare_answer_rate']:.1f}%" if "bare_answer_rate" in v else "-")
    rows.append(row)
  lines += ["## Summary", "",
            "MAE = mean over categories of |target - achieved|, averaged over occupations (std: "
            "population std over occupations). KL(target || achieved) in nats with epsilon 1e-10; "
            "JS in nats. Intervals: 95% bias-corrected (basic) bootstrap over the rounds of each "
            "occupation, for the true MAE, around the corrected estimate 2 MAE - mean(replicates) "
            "(the plain MAE is biased upwards near zero); the interval reaches 0 when the MAE is "
            "within the floor's range. "
            "MAE floor: the MAE a model answering exactly from the targets would show with the same "
            "numbers of parsed answers (mean and 95% range); an MAE within it is as good as a "
            "perfect match at this sample size. Unparsed answers are left out of the achieved "
            "distributions." + (" Bare answers: stories that are only a category word (the "
                                "judge counts them as that category)." if any_bare else ""), ""]
  lines += markdown_table(header, rows) + [""]
  if plots and len(versions) > 1:
    lines += ["![MAE per version](plots/summary.png)", ""]
  lines += _belief_section(versions, plots)
  for name, v in versions.items():
    cats = _categories(v)
    order = " / ".join(cats)
    lines += [f"## {name}", ""]
    if plots:
      lines += [f"![{name}: target vs achieved](plots/{name}.png)", ""]
    lines += [f"Distributions list the categories in this order: {order}.", ""]
    has_exact = any("exact" in o for o in v["per_occupation"])
    has_answers = any("answer_probs" in o for o in v["per_occupation"])
    header = (["occupation", "target", "achieved", "achieved 95% CI", "MAE", "KL", "JS", "n",
               "unparsed"] + (["exact steering", "exact steering MAE"] if has_exact else [])
              + (["exact answers", "non-answer"] if has_answers else []))
    rows = []
    for o in v["per_occupation"]:
      cis = o.get("achieved_ci")
      row = [o["occupation"], " / ".join(fmt(x, 2) for x in o["target"]),
             " / ".join(fmt(x, 2) for x in o["achieved"]),
             " / ".join(fmt_ci(c, 2) for c in cis) if cis else "-",
             fmt(o["mae"]), fmt(o.get("kl")), fmt(o.get("js")), o["n"], o["n_unparsed"]]
      if has_exact:
        row += [" / ".join(fmt(x, 2) for x in o["exact"]) if "exact" in o else "-",
                fmt(o.get("exact_mae"))]
      if has_answers:
        row += [" / ".join(fmt(x, 2) for x in o["answer_probs"]) if "answer_probs" in o else "-",
                fmt(o.get("non_answer"))]
      rows.append(row)
    lines += markdown_table(header, rows) + [""]
  return "\n".join(lines)


def belief_points(v: Mapping) -> tuple[Any, Any] | None:
  """The model's belief (its exact steering distribution) against what its samples achieved, one
  point per (occupation, category) with parsed answers: (belief [N], achieved [N]), or None when
  the version has no exact steering distribution."""
  import numpy as np
  occs = [o for o in v["per_occupation"] if "exact" in o and o["n"] > o["n_unparsed"]]
  if not occs:
    return None
  return (np.array([x for o in occs for x in o["exact"]], np.float64),
          np.array([x for o in occs for x in o["achieved"]], np.float64))


def belief_correlation(v: Mapping) -> float | None:
  """Pearson correlation of ``belief_points`` (None without them or without spread)."""
  import numpy as np
  points = belief_points(v)
  if points is None or len(points[0]) < 3 or np.std(points[0]) == 0 or np.std(points[1]) == 0:
    return None
  return float(np.corrcoef(*points)[0, 1])


def _belief_section(versions: Mapping[str, Mapping], plots: bool) -> list[str]:
  """The paper's belief-against-generation analysis: how well what the steering token says
  the model will answer predicts what it answers."""
  rows = []
  for name, v in versions.items():
    points = belief_points(v)
    if points is None:
      continue
    gap = float(abs(points[0] - points[1]).mean())
    rows.append([name, fmt(belief_correlation(v)), fmt(gap), len(points[0])])
  if not rows:
    return []
  lines = ["## Belief against generation", "",
           "Per occupation and category: the model's exact steering distribution (its belief) "
           "against the frequency its sampled answers achieved (parsed answers only); Pearson "
           "correlation over the points and their mean absolute gap.", ""]
  lines += markdown_table(["version", "correlation", "mean gap", "points"], rows) + [""]
  if plots:
    lines += [f"![belief {r[0]}](plots/belief_{r[0]}.png)" for r in rows] + [""]
  return lines


# ---------------------------------------------------------------------------------------------------
# Plots


def figure(width: float, height: float):
  """A matplotlib Figure of ``width`` x ``height`` inches on the Agg canvas (no pyplot)."""
  # matplotlib: imported on the first plot only (a second of import time the tables do not need)
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(width, height), dpi=100)
  FigureCanvasAgg(fig)
  return fig


def plot_version(name: str, v: Mapping, path: str | os.PathLike) -> None:
  """Target vs achieved per occupation, one panel per category, 95 % bootstrap error bars."""
  import numpy as np
  occs = v["per_occupation"]
  cats = _categories(v)
  n, k = len(occs), len(cats)
  x = np.arange(n)
  target = np.array([o["target"] for o in occs], np.float64)
  achieved = np.array([o["achieved"] for o in occs], np.float64)
  fig = figure(max(6.0, 0.45 * n + 2.5), 2.2 * k + 1.6)
  axes = fig.subplots(k, 1, sharex=True, squeeze=False)[:, 0]
  for c, ax in enumerate(axes):
    yerr = None
    if all(o.get("achieved_ci") for o in occs):
      ci = np.array([o["achieved_ci"][c] for o in occs], np.float64)  # [n, 2]
      yerr = np.clip(np.stack([achieved[:, c] - ci[:, 0], ci[:, 1] - achieved[:, c]]), 0, None)
    ax.bar(x, achieved[:, c], width=0.6, color="C0", alpha=0.8, yerr=yerr, capsize=2,
           error_kw={"elinewidth": 1}, label="achieved (95% CI)")
    ax.scatter(x, target[:, c], marker="_", s=300, linewidths=2.5, color="black", zorder=3,
               label="target")
    if all("exact" in o for o in occs):
      exact = np.array([o["exact"][c] for o in occs], np.float64)
      ax.scatter(x, exact, marker="x", s=30, color="C3", zorder=4, label="exact steering")
    ax.set_ylim(0, 1)
    ax.set_ylabel("probability")
    ax.set_title(cats[c], loc="left", fontsize="medium")
    ax.grid(axis="y", alpha=0.3)
  axes[0].legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize="small", ncol=3,
                 frameon=False)
  axes[-1].set_xticks(x)
  axes[-1].set_xticklabels([o["occupation"] for o in occs], rotation=60, ha="right",
                           fontsize="small")
  ci = v.get("mae_ci")
  floor = v.get("mae_floor")
  corrected = v.get("mae_corrected")
  fig.suptitle(f"{name}: target vs achieved; MAE {fmt(v['mae'])}"
               + (f" (corrected {fmt(corrected)} {fmt_ci(ci)})" if ci and corrected is not None
                  else "")
               + (f" (floor {fmt(floor)})" if floor is not None else "")
               + f", unparsed {100 * v['unparsed_rate']:.1f}%")
  fig.tight_layout()
  fig.savefig(path, format="png")


def plot_summary(versions: Mapping[str, Mapping], path: str | os.PathLike) -> None:
  """MAE per version with its 95 % interval (and the exact-distribution MAE where available)."""
  import numpy as np
  names = list(versions)
  x = np.arange(len(names))
  mae = np.array([versions[n]["mae"] for n in names], np.float64)
  fig = figure(max(4.0, 1.0 * len(names) + 2.0), 3.5)
  ax = fig.subplots()
  ax.bar(x, mae, width=0.6, color="C0", label="MAE")
  if all(versions[n].get("mae_ci") and versions[n].get("mae_corrected") is not None
         for n in names):
    ci = np.array([versions[n]["mae_ci"] for n in names], np.float64)
    corrected = np.array([versions[n]["mae_corrected"] for n in names], np.float64)
    ax.errorbar(x, corrected, yerr=np.clip(np.stack([corrected - ci[:, 0], ci[:, 1] - corrected]),
                                           0.0, None),
                fmt="o", color="k", capsize=4, label="bias-corrected MAE (95% CI)")
  exact = [versions[n].get("exact_mae") for n in names]
  if any(e is not None for e in exact):
    ax.scatter([i for i, e in enumerate(exact) if e is not None],
               [e for e in exact if e is not None], marker="x", color="C3", zorder=3,
               label="exact-distribution MAE")
  ax.set_xticks(x)
  ax.set_xticklabels(names)
  ax.set_ylabel("MAE")
  ax.set_ylim(bottom=0)
  ax.legend(fontsize="small")
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, format="png")


def plot_belief(name: str, v: Mapping, path: str | os.PathLike) -> None:
  """Scatter of ``belief_points``: belief (x) against achieved (y), the diagonal for reference."""
  belief, achieved = belief_points(v)
  fig = figure(4.2, 4.0)
  ax = fig.subplots()
  ax.plot([0, 1], [0, 1], color="0.6", linewidth=1, linestyle="--", label="achieved = belief")
  ax.scatter(belief, achieved, s=14, color="C0", alpha=0.8)
  ax.set_xlim(-0.02, 1.02)
  ax.set_ylim(-0.02, 1.02)
  ax.set_xlabel("belief: exact steering probability")
  ax.set_ylabel("achieved: sampled frequency")
  r = belief_correlation(v)
  ax.set_title(f"{name}: belief against generation" + (f" (r = {r:.3f})" if r is not None else ""),
               fontsize="medium")
  ax.legend(loc="upper left", fontsize="small", frameon=False)
  fig.tight_layout()
  fig.savefig(path, format="png")
