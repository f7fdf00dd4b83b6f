"""The package's layers (pyproject's ``[tool.importlinter]`` contract): no module imports from a
layer above its own, so the import graph has no circle across the pipeline's folders."""

from __future__ import annotations

import pathlib

import pytest

importlinter_cli = pytest.importorskip("importlinter.cli", reason="import-linter (the test extra)")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_layers_contract_is_kept(monkeypatch):
  monkeypatch.chdir(ROOT)  # the contract sits in pyproject.toml at the repository root
  monkeypatch.syspath_prepend(str(ROOT))  # this checkout's package, whichever is installed
  assert importlinter_cli.lint_imports(config_filename=str(ROOT / "pyproject.toml"),
                                       no_cache=True) == 0, "see the broken contract printed above"
