"""The package's layers (pyproject's ``[tool.importlinter]`` contract): no module imports from a
layer above its own, so the import graph has no circle across the pipeline's folders."""

from __future__ import annotations

import dataclasses
import pathlib

import pytest

importlinter_cli = pytest.importorskip("importlinter.cli", reason="import-linter (the test extra)")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_layers_contract_is_kept(monkeypatch):
  monkeypatch.chdir(ROOT)  # the contract sits in pyproject.toml at the repository root
  monkeypatch.syspath_prepend(str(ROOT))  # this checkout's package, whichever is installed
  assert importlinter_cli.lint_imports(config_filename=str(ROOT / "pyproject.toml"),
                                       no_cache=True) == 0, "see the broken contract printed above"


def test_extension_points_agree():
  """The lists an extension point still has more than one of name the same things: the config's
  stage choices are the stages' registry, every stage trains on a registered record kind and every
  kind has its collator, and every family of the registry reads its own config fields or shares
  Llama's."""
  from distfair_jax import config
  from distfair_jax.data import collate, kinds
  from distfair_jax.model import family
  from distfair_jax.model.llama_config import ARCHITECTURES
  from distfair_jax.train import stages
  assert tuple(stages.STAGE_CLASSES) == stages.STAGES == tuple(s.value for s in config.Stage)
  assert set(stages.SECTIONS.values()) <= {f.name for f in dataclasses.fields(config.Config)}
  assert {s.records_kind for s in stages.STAGE_CLASSES.values()} == set(kinds.KINDS)
  assert {k.batch for k in kinds.KINDS.values()} == set(collate.COLLATORS)
  assert set(family.MODEL_CLASSES) == set(ARCHITECTURES.values())
  assert set(family.HF_FIELDS) <= set(family.MODEL_CLASSES)
