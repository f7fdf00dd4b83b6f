"""The one filesystem layer: atomic writes, and what a killed writer leaves behind."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from distfair_jax import fileio
from distfair_jax.errors import InputError


def _dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def test_atomic_file_and_directory_writes(tmp_path):
  path = tmp_path / "a" / "b.json"
  fileio.write_json(path, {"x": 1})
  assert fileio.read_json(path) == {"x": 1}
  fileio.write_jsonl(tmp_path / "rows.jsonl", [{"a": 1}, {"b": "é"}])
  assert fileio.read_jsonl(tmp_path / "rows.jsonl") == [(1, {"a": 1}), (2, {"b": "é"})]
  with pytest.raises(InputError, match=r"b\.json: json: expected finite numbers only"):
    fileio.write_json(path, {"x": float("nan")})
  assert fileio.read_json(path) == {"x": 1}  # the failed write changed nothing
  dst = tmp_path / "dir"
  with fileio.atomic_dir(dst) as tmp:
    (tmp / "f").write_text("one")
    assert not dst.exists()  # nothing at the destination until the block succeeds
  assert (dst / "f").read_text() == "one"
  with pytest.raises(InputError, match="overwrite"):
    with fileio.atomic_dir(dst):
      pass
  with pytest.raises(RuntimeError):
    with fileio.atomic_dir(dst, overwrite=True) as tmp:
      (tmp / "f").write_text("two")
      raise RuntimeError("failed half-way")
  assert (dst / "f").read_text() == "one"  # the old one stays
  assert sorted(os.listdir(tmp_path)) == ["a", "dir", "rows.jsonl"]  # no temporaries left
  with pytest.raises(InputError, match=r"nope\.json: file: expected a JSON object, got no such"):
    fileio.read_json(tmp_path / "nope.json")
  relative = fileio.as_path("x/y")
  assert str(relative) == os.path.abspath("x/y") and str(fileio.as_path("gs://b/r")) == "gs://b/r"


def test_leftovers_of_dead_processes_are_removed_and_others_named(tmp_path, capsys):
  dst = tmp_path / "out"
  dead = tmp_path / fileio.temporary_name("out").replace(f"-{os.getpid()}-", f"-{_dead_pid()}-")
  live = tmp_path / fileio.temporary_name("out")  # this process: still running
  other_host = tmp_path / ".out.tmp-elsewhere-1-0123abcd"
  for d in (dead, live, other_host):
    d.mkdir()
    (d / "part").write_text("x")
  (tmp_path / ".other.tmp-elsewhere-1-0123abcd").mkdir()  # another destination's: not ours
  with fileio.atomic_dir(dst) as tmp:
    (tmp / "f").write_text("done")
  err = capsys.readouterr().err
  assert not dead.exists() and f"{dead}: removed what an interrupted write of out left" in err
  assert live.exists() and other_host.exists()
  assert f"{live}: a temporary copy of out from process {os.getpid()}" in err
  assert f"{other_host}: a temporary copy of out from process 1 on elsewhere" in err
  assert (dst / "f").read_text() == "done"
