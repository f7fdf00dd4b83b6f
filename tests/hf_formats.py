"""Where the real Hugging Face format fixtures are (../shared/fixtures/hf-formats), for the tests."""

from __future__ import annotations

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORMATS = os.environ.get("DISTFAIR_HF_FORMATS",
                         os.path.join(ROOT, "..", "shared", "fixtures", "hf-formats"))


def family_dir(name: str) -> str:
  """The fixture folder of one family; the test is skipped, saying why, where it is absent."""
  path = os.path.normpath(os.path.join(FORMATS, name))
  if not os.path.isdir(path):
    pytest.skip(f"{path}: the real Hugging Face format fixtures are absent (they live in the "
                f"project's shared folder, ../shared/fixtures/hf-formats; set DISTFAIR_HF_FORMATS)")
  return path
