"""Report: metrics.json, report.md and PNG plots written atomically; `distfair report` rebuilds them."""

from __future__ import annotations

import argparse
import json
import shutil

import numpy as np
import pytest

from distfair_jax.evaluation import metrics
from distfair_jax.evaluation import report
from distfair_jax.commands import report as report_command
from distfair_jax.errors import InputError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TARGETS = {"registered nurses": [0.14, 0.86], "software developers": [0.8, 0.2],
           "chefs | cooks": [0.5, 0.5]}


def _version(seed: int, exact: bool) -> dict:
  rng = np.random.default_rng(seed)
  rows = [{"occupation": o, "category": None if rng.random() < 0.1 else int(rng.random() < 0.5)}
          for o in TARGETS for _ in range(40)]
  return metrics.evaluate_version(rows, TARGETS, 2, n_bootstrap=200, seed=seed,
                                  categories=["male", "female"],
                                  exact={o: [0.5, 0.5] for o in TARGETS} if exact else None)


@pytest.fixture(scope="module")
def versions():
  return {"v1": _version(1, True), "v2": _version(2, False)}


@pytest.fixture(scope="module")
def written(tmp_path_factory, versions):
  run = tmp_path_factory.mktemp("run")
  meta = {"decoding": {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 32}, "steering": "model"}
  return run, report.write_report(run, versions, meta=meta)


def _is_png(path) -> bool:
  import matplotlib.image
  data = path.read_bytes()
  return data.startswith(PNG_SIGNATURE) and matplotlib.image.imread(path).ndim == 3


def test_files_written(written, versions):
  run, files = written
  ev = run / "eval"
  assert set(files) == {"metrics.json", "report.md", "plots/v1.png", "plots/v2.png",
                        "plots/summary.png", "plots/belief_v1.png"}   # v2 has no belief
  doc = json.loads((ev / "metrics.json").read_text())
  assert doc["format"] == "distfair-metrics" and doc["meta"]["steering"] == "model"
  assert doc["versions"] == json.loads(json.dumps(versions))
  for name in ("v1", "v2", "summary"):
    assert _is_png(ev / "plots" / f"{name}.png")
  md = (ev / "report.md").read_text()
  assert "| version | MAE |" in md and "exact steering MAE" in md
  assert "## v1" in md and "## v2" in md and "registered nurses" in md
  assert "chefs \\| cooks" in md  # a '|' in a name does not break the table
  assert f"{versions['v1']['mae']:.3f}" in md
  assert "plots/v1.png" in md and "temperature" in md
  assert not [p for p in ev.rglob("*") if p.name.startswith(".")]  # no temporaries left


def test_refuses_overwrite(written, versions):
  run, _ = written
  with pytest.raises(InputError, match="overwrite"):
    report.write_report(run, versions)


def test_rebuild_from_metrics(written, tmp_path):
  run = tmp_path / "copy"
  shutil.copytree(written[0], run)
  before = (run / "eval" / "metrics.json").read_bytes()
  (run / "eval" / "report.md").unlink()
  shutil.rmtree(run / "eval" / "plots")
  parser = argparse.ArgumentParser()
  report_command.add_arguments(parser)
  assert report_command.run(parser.parse_args([str(run)])) == 0
  assert (run / "eval" / "metrics.json").read_bytes() == before
  assert (run / "eval" / "report.md").read_text() == (written[0] / "eval" / "report.md").read_text()
  assert _is_png(run / "eval" / "plots" / "v2.png")


def test_failure_leaves_nothing_half_written(tmp_path, versions, monkeypatch):
  def broken(*args, **kwargs):
    raise RuntimeError("plotting failed")
  monkeypatch.setattr(report, "plot_summary", broken)
  with pytest.raises(RuntimeError):
    report.write_report(tmp_path, versions)
  ev = tmp_path / "eval"
  assert not (ev / "metrics.json").exists() and not (ev / "report.md").exists()
  assert not ev.exists() or not any(ev.rglob("*"))  # everything is rendered before any write


def test_markdown_only(tmp_path, versions):
  files = report.write_report(tmp_path / "a", versions, plots=False)
  assert set(files) == {"metrics.json", "report.md"}
  assert "plots/" not in files["report.md"].read_text()
  assert report.load_metrics(tmp_path / "a")["versions"]["v2"]["mae"] == versions["v2"]["mae"]


@pytest.mark.parametrize("content, match", [
    (None, "no such file"),
    ("{not json", "JSON"),
    ('{"versions": {}}', "versions"),
    ('{"versions": {"v1": {"mae": 0.1}}}', "mae_std"),
    ('{"versions": {"../x": {}}}', "versions"),
])
def test_bad_metrics_file(tmp_path, content, match):
  if content is not None:
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "metrics.json").write_text(content)
  with pytest.raises(InputError, match=match):
    report.rebuild_report(tmp_path)


def test_belief_against_generation():
  """Belief (exact steering distribution) against achieved frequencies, per occupation and
  category: the correlation and mean gap the report shows, from the points themselves."""
  rows = [{"occupation": o, "category": c} for o, cats in
          (("registered nurses", [1] * 9 + [0]), ("software developers", [0] * 7 + [1] * 3),
           ("chefs | cooks", [0] * 5 + [1] * 5)) for c in cats]
  exact = {"registered nurses": [0.15, 0.85], "software developers": [0.75, 0.25],
           "chefs | cooks": [0.5, 0.5]}
  v = metrics.evaluate_version(rows, TARGETS, 2, n_bootstrap=0, exact=exact)
  belief, achieved = report.belief_points(v)
  np.testing.assert_allclose(belief, [0.15, 0.85, 0.75, 0.25, 0.5, 0.5])
  np.testing.assert_allclose(achieved, [0.1, 0.9, 0.7, 0.3, 0.5, 0.5])
  assert report.belief_correlation(v) == pytest.approx(np.corrcoef(belief, achieved)[0, 1])
  md = report.render_markdown({"versions": {"v2": v}, "meta": {}}, plots=False)
  r = report.belief_correlation(v)
  assert r > 0.98 and "## Belief against generation" in md and f"| v2 | {r:.3f} | 0.033 | 6 |" in md
  assert report.belief_points(metrics.evaluate_version(rows, TARGETS, 2, n_bootstrap=0)) is None
