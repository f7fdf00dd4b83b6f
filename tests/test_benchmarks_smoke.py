"""The benchmark scripts run end to end at their --smoke sizes and write JSON with the expected keys.

Each script runs in a subprocess (as a user runs it), on one CPU device; no timing is asserted.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, out: Path) -> dict:
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--smoke", "--out",
                         str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return json.loads(out.read_text())


@pytest.mark.slow
def test_train_step_smoke(tmp_path):
  res = _run("train_step.py", tmp_path / "train_step.json")
  assert res["benchmark"] == "train_step" and res["goal_ratio"] == 2.0
  assert [(s["name"], s["workload"]) for s in res["sizes"]] == [("micro", "real"),
                                                                ("micro", "synthetic")]
  for size in res["sizes"]:
    for side in ("ours", "ours_cached", "ours_pooled", "ours_rows", "ours_rows_cached",
                 "reference_pass", "ours_rows_pooled", "torch"):
      e = size[side]["examples_per_s"]
      assert 0 < e["min"] <= e["median"] <= e["max"]
    # pooled = batch / (cached step + share x reference pass), per run
    b, share = size["batch"], size["pooled_share"]
    for pooled_side, cached_side in (("ours_pooled", "ours_cached"),
                                     ("ours_rows_pooled", "ours_rows_cached")):
      for run, pooled in enumerate(size[pooled_side]["per_run"]):
        t = (b / size[cached_side]["per_run"][run] +
             share * b / size["reference_pass"]["per_run"][run])
        assert pooled == pytest.approx(b / t)
    assert 0 < share < 1 and size["pooled_epochs"] == 3
    for key in ("ratio", "ratio_cached", "ratio_pooled", "ratio_rows", "ratio_rows_pooled"):
      r = size[key]
      assert 0 < r["min"] <= r["median"] <= r["max"] and r["of_medians"] > 0
      assert len(r["per_run"]) == 2
    # Same weights and sequences on every side (packed or rows): the first step's loss agrees.
    for side, diff in size["loss_abs_diff"].items():
      assert diff < 1e-4 * max(1.0, abs(size["first_step_loss"]["torch"])), side
    assert size["compiles"] == {"ours": 1, "ours_cached": 1, "ours_rows": 1, "ours_rows_cached": 1}
    assert size["packed_shape"][0] * 2 == size["rows_shape"][0]  # one packed row per pair
  points = [r for r in res["scaling"] if "tokens" in r]
  assert [(r["batch"], r["length"]) for r in points] == [(4, 16), (4, 32)]
  assert all(r["step_s"] > 0 for r in points)
  assert "fit" in res["scaling"][-1]


@pytest.mark.slow
def test_gpu_smoke_on_cpu(tmp_path):
  res = _run("gpu.py", tmp_path / "gpu.json")
  assert res["smoke"] and res["errors"] == []
  (train,) = res["train"]
  assert train["reference"] == "online" and train["remat"] == "dots"
  for key in ("step_s", "tokens_per_s", "flops_per_step", "tflops_per_s"):
    assert train[key] > 0 and math.isfinite(train[key]), key
  assert train["mfu"] is None  # no known peak for a CPU
  assert train["compiles"] == 1 and math.isfinite(train["loss"])
  dec = res["decode"]
  for key in ("decode_tokens_per_s", "step_s", "bytes_per_step", "achieved_tb_per_s"):
    assert dec[key] > 0, key
  assert dec["bytes_per_step"] == dec["param_bytes"] + dec["kv_cache_bytes"]
  assert dec["achieved_over_roofline"] is None  # no known HBM bandwidth for a CPU


@pytest.mark.slow
def test_adapter_curve_smoke(tmp_path):
  """benchmarks/adapter_curve.py --smoke: three `distfair train` runs (q/v, all-linear, full) on
  the tiny preset, each with its held-out exact steering MAE every few steps; a rerun reuses them."""
  out = tmp_path / "curve.json"
  cmd = [sys.executable, str(ROOT / "benchmarks" / "adapter_curve.py"), "--smoke", "--rows", "4",
         "--every", "4", "--run-dir", str(tmp_path / "runs"), "--out", str(out),
         "--plot", str(tmp_path / "curve.png")]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  res = json.loads(out.read_text())
  assert res["benchmark"] == "adapter_curve" and 0 < res["marginal_mae"] < 0.5
  assert [s["side"] for s in res["sides"]] == ["qv", "all-linear", "full"]
  for side in res["sides"]:
    steps = [step for step, _ in side["curve"]]
    assert steps[:2] == [4, 8] and steps[-1] == side["steps"] > 8
    assert all(0 <= mae <= 1 for _, mae in side["curve"]) and side["wall_s"] > 0
  overrides = {s["side"]: s["overrides"] for s in res["sides"]}
  assert "lora.targets=all-linear" in overrides["all-linear"]
  assert "lora.enabled=false" in overrides["full"]
  assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
  # a rerun reuses the finished runs (no training) and refuses to replace --out without --overwrite
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 2 and "--overwrite" in proc.stderr
  proc = subprocess.run(cmd + ["--overwrite"], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0 and "hybrid: step" not in proc.stdout + proc.stderr
  assert json.loads(out.read_text())["sides"] == res["sides"]


@pytest.mark.slow
def test_layer_modes_smoke(tmp_path):
  """benchmarks/layer_modes.py --smoke: stage 2's step on one batch of packed story pairs, each
  layer mode in its own process, with its compiled memory and times; the modes really differ in
  layout (what the JSON records) and the rematerialised scan needs the least temporaries."""
  out = tmp_path / "modes.json"
  cmd = [sys.executable, str(ROOT / "benchmarks" / "layer_modes.py"), "--smoke", "--steps", "2",
         "--modes", "unrolled-none,scanned-full", "--out", str(out)]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  res = json.loads(out.read_text())
  assert res["benchmark"] == "layer_modes" and res["baseline"] == "unrolled-none"
  plain, scanned = res["modes"]
  assert (plain["scan_layers"], plain["remat"]) == (False, "none")
  assert (scanned["scan_layers"], scanned["remat"]) == (True, "full")
  for mode in res["modes"]:
    assert mode["batch_shape"][0] == 4 and mode["batch_shape"][1] >= 256  # 4 packed story pairs
    assert len(mode["step_s"]) == 2 and all(t > 0 for t in mode["step_s"])
    assert mode["compile_s"] > 0 and mode["peak_resident_mib"] > 0 and mode["trainable_params"] > 0
    assert math.isfinite(mode["first_step_loss"])
  assert 0 < scanned["temporaries_mib"] < plain["temporaries_mib"]
  assert "temporaries MiB" in proc.stdout
