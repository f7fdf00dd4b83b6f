"""Files and directories, through one filesystem layer (``etils.epath``, what orbax uses).

Every run-directory path goes through here, so that a local path and a bucket URL (``gs://...``)
take the same code. What it provides:

- ``as_path(p)``: an ``epath.Path``; a local relative path becomes absolute (orbax and the
  checkpoint readers require absolute paths), a URL stays as it is.
- Reading: ``read_text``, ``read_json``, ``read_jsonl``, with one-line ``InputError`` messages
  naming the file and what was expected.
- Atomic writing: ``write_text``, ``write_json``, ``write_jsonl`` write a temporary sibling and
  rename it over the destination; ``atomic_dir(dst)`` yields a temporary directory next to ``dst``
  and renames it into place on success (replacing ``dst`` only with ``overwrite``), removing it on
  failure. A reader never sees a half-written file or directory.
- Git LFS pointers: a repository cloned without ``git lfs`` holds a ~130-byte text stub
  (``version https://git-lfs.github.com/spec/v1`` / ``oid sha256:...`` / ``size N``) where a
  tokenizer, a safetensors file or a records file should be. ``check_not_lfs_pointer(path)`` names
  such a file ("PATH: a Git LFS pointer, not the file"); every reader here calls it.
- Leftovers: a process killed with SIGKILL cannot clean up. Temporary names carry the host and the
  process id (``.NAME.tmp-HOST-PID-RANDOM``); before writing ``NAME`` again, ``sweep_leftovers``
  removes those whose process provably died (this host, no such process) and names the others on
  stderr (another host's, or a live process's).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import sys
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from etils import epath

from distfair_jax.errors import InputError

__all__ = ["Path", "as_path", "is_remote", "is_lfs_pointer", "check_not_lfs_pointer", "read_text", "read_json", "read_jsonl", "write_bytes",
           "write_text", "write_json", "write_jsonl", "copy_file", "copy_tree", "atomic_dir",
           "local_dir_for", "local_copy", "make_dirs", "sweep_leftovers", "check_new_dir",
           "temporary_name", "writable_dir"]

Path = epath.Path
PathLike = str | os.PathLike
_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"
_TMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<host>[A-Za-z0-9_.]+)-(?P<pid>\d+)-[0-9a-f]{8}$")


def is_remote(p: PathLike) -> bool:
  """Whether ``p`` is a URL (``gs://``, ``s3://``, ...) rather than a local path."""
  return "://" in os.fspath(p)


def as_path(p: PathLike) -> epath.Path:
  """An ``epath.Path``: local paths expanded (``~``) and made absolute, URLs unchanged."""
  s = os.fspath(p)
  if is_remote(s):
    return epath.Path(s)
  return epath.Path(os.path.abspath(os.path.expanduser(s)))


def make_dirs(p: PathLike) -> epath.Path:
  """``mkdir -p``; for a URL whose bucket does not exist, an InputError naming it (one line)."""
  p = as_path(p)
  try:
    p.mkdir(parents=True, exist_ok=True)
  except FileNotFoundError as e:
    if not is_remote(p):
      raise
    bucket = "/".join(os.fspath(p).split("/")[:3])
    raise InputError(f"{p}: bucket: expected an existing bucket you can write to, got "
                     f"{bucket} missing ({e})") from None
  return p


def _file_above(p: epath.Path) -> epath.Path | None:
  """The nearest existing non-directory at or above local ``p`` (None: there is none)."""
  for q in (p, *p.parents):
    if q.exists():
      return None if q.is_dir() else q
  return None


def _probe_write(d: epath.Path) -> None:
  """Creates and removes a file in ``d`` (OSError if that cannot be done)."""
  probe = d / temporary_name("write-probe")
  probe.write_bytes(b"")
  probe.unlink()


def writable_dir(path: PathLike, what: str = "run_dir") -> epath.Path:
  """``path`` as a directory this process can write (created if absent); InputError in one line
  naming ``what`` if it is a file, lies under a file, or cannot be created or written. A URL is
  created (``make_dirs``); its first write shows whether it is writable."""
  p = as_path(path)
  if is_remote(p):
    return make_dirs(p)
  blocker = _file_above(p)
  if blocker is not None:
    got = "a file" if blocker == p else f"a path under the file {blocker}"
    raise InputError(f"{p}: {what}: expected a directory, got {got}")
  try:
    p.mkdir(parents=True, exist_ok=True)
    _probe_write(p)
  except OSError as e:
    raise InputError(f"{p}: {what}: expected a directory this user can write, got "
                     f"{e.strerror or type(e).__name__} ({e.filename or p})") from None
  return p


# ------------------------------------------------------------------------------------------------
# Git LFS pointers

LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/"
_LFS_POINTER_MAX_BYTES = 1024  # a pointer is about 130 bytes; the spec caps it at 1024


def is_lfs_pointer(head: bytes) -> bool:
  """Whether ``head`` (a file's first bytes) is a Git LFS pointer stub."""
  return head.lstrip(b"\xef\xbb\xbf").startswith(LFS_POINTER_PREFIX)


def lfs_pointer_error(path: PathLike) -> InputError:
  return InputError(f"{path}: a Git LFS pointer, not the file (fetch the real file: "
                    f"`git lfs pull` in its repository, or download it again)")


def check_not_lfs_pointer(path: PathLike) -> None:
  """InputError naming ``path`` if it is a Git LFS pointer in place of the file; a missing path or
  a directory passes (the caller reports those)."""
  p = as_path(path)
  try:
    if not p.is_file() or (not is_remote(p) and os.path.getsize(p) > _LFS_POINTER_MAX_BYTES):
      return
    with p.open("rb") as f:
      head = f.read(len(LFS_POINTER_PREFIX) + 3)
  except OSError:
    return
  if is_lfs_pointer(head):
    raise lfs_pointer_error(p)


def _say(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# Reading


def read_text(path: PathLike, what: str = "a text file") -> str:
  """The UTF-8 text of ``path``; InputError naming the file and ``what`` was expected."""
  p = as_path(path)
  try:
    data = p.read_bytes()
    if len(data) <= _LFS_POINTER_MAX_BYTES and is_lfs_pointer(data):
      raise lfs_pointer_error(p)
    return data.decode("utf-8")
  except FileNotFoundError:
    raise InputError(f"{p}: file: expected {what}, got no such file") from None
  except IsADirectoryError:
    raise InputError(f"{p}: file: expected {what}, got a directory") from None
  except UnicodeDecodeError:
    raise InputError(f"{p}: file: expected {what} in UTF-8, got undecodable bytes") from None


def read_json(path: PathLike, what: str = "a JSON object") -> dict:
  """A JSON object from ``path``; InputError naming the file otherwise."""
  text = read_text(path, what)
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    raise InputError(f"{as_path(path)}: json: expected {what}, got invalid JSON ({e})") from None
  if not isinstance(data, dict):
    raise InputError(f"{as_path(path)}: json: expected {what}, got {type(data).__name__}")
  return data


def read_jsonl(path: PathLike, what: str = "one JSON object per line") -> list[tuple[int, Any]]:
  """(line number, value) of every non-empty line of a JSONL file."""
  out = []
  for i, line in enumerate(read_text(path, what).splitlines(), start=1):
    if not line.strip():
      continue
    try:
      out.append((i, json.loads(line)))
    except json.JSONDecodeError as e:
      raise InputError(f"{as_path(path)}: line {i}: json: expected {what}, got {e.msg}") from None
  return out


# ------------------------------------------------------------------------------------------------
# Leftovers of killed writers


def temporary_name(name: str) -> str:
  """``.NAME.tmp-HOST-PID-RANDOM``: a sibling of NAME that ``sweep_leftovers`` can attribute."""
  return f".{name}.tmp-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return True


def sweep_leftovers(dst: PathLike) -> list[epath.Path]:
  """Removes the temporary siblings of ``dst`` left by killed processes of this host and names
  those it cannot prove stale (another host's, or a process still running); returns the latter."""
  dst = as_path(dst)
  parent = dst.parent
  if not parent.exists():
    return []
  kept = []
  for p in parent.iterdir():
    m = _TMP.match(p.name)
    if not m or m.group("name") != dst.name:
      continue
    if m.group("host") == _HOST and not _alive(int(m.group("pid"))) and not is_remote(dst):
      _say(f"{p}: removed what an interrupted write of {dst.name} left (process "
           f"{m.group('pid')} is gone)")
      if p.is_dir():
        p.rmtree(missing_ok=True)
      else:
        p.unlink(missing_ok=True)
    else:
      _say(f"{p}: a temporary copy of {dst.name} from process {m.group('pid')} on "
           f"{m.group('host')} (still running, or another host's: not removed)")
      kept.append(p)
  return kept


# ------------------------------------------------------------------------------------------------
# Atomic writes


def write_bytes(path: PathLike, data: bytes) -> epath.Path:
  """Writes ``data`` to ``path`` atomically (a temporary sibling renamed over it)."""
  p = as_path(path)
  make_dirs(p.parent)
  if is_remote(p):  # an object store writes an object whole or not at all
    p.write_bytes(data)
    return p
  sweep_leftovers(p)
  tmp = p.parent / temporary_name(p.name)
  try:
    tmp.write_bytes(data)
    tmp.replace(p)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
  return p


def write_text(path: PathLike, text: str) -> epath.Path:
  """Writes UTF-8 ``text`` to ``path`` atomically."""
  return write_bytes(path, text.encode("utf-8"))


def write_json(path: PathLike, data: Any, *, indent: int | None = 2) -> epath.Path:
  """Writes ``data`` as JSON (finite numbers only), atomically."""
  try:
    text = json.dumps(data, indent=indent, ensure_ascii=False, allow_nan=False)
  except ValueError as e:
    raise InputError(f"{as_path(path)}: json: expected finite numbers only, got {e}") from None
  return write_text(path, text + "\n")


def write_jsonl(path: PathLike, rows: Iterable[Mapping[str, Any]]) -> epath.Path:
  """Writes rows as UTF-8 JSONL (one compact object per line), atomically."""
  return write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def copy_file(src: PathLike, dst: PathLike) -> epath.Path:
  """Copies a file (either side local or a URL), atomically at the destination."""
  return write_bytes(dst, as_path(src).read_bytes())


def copy_tree(src: PathLike, dst: PathLike) -> epath.Path:
  """Copies a directory tree file by file (either side local or a URL)."""
  src, dst = as_path(src), as_path(dst)
  for path in _files(src):
    copy_file(path, dst / str(path)[len(str(src)):].lstrip("/"))
  return dst


def _files(root: epath.Path) -> Iterator[epath.Path]:
  """Every file below ``root`` (``iterdir`` keeps a URL's scheme, which ``walk`` drops)."""
  for p in root.iterdir():
    if p.is_dir():
      yield from _files(p)
    else:
      yield p


def check_new_dir(dst: PathLike, overwrite: bool, what: str = "output") -> None:
  """InputError unless ``dst`` is absent, an empty directory, or ``overwrite`` is set."""
  dst = as_path(dst)
  if not dst.exists():
    return
  if not dst.is_dir():
    raise InputError(f"{dst}: {what}: expected a directory path, got an existing file")
  if any(True for _ in dst.iterdir()) and not overwrite:
    raise InputError(f"{dst}: {what}: expected a new or empty directory, got a non-empty one "
                     f"(pass --overwrite / overwrite=True to replace it)")


@contextlib.contextmanager
def atomic_dir(dst: PathLike, *, overwrite: bool = False, what: str = "output"
               ) -> Iterator[epath.Path]:
  """Yields a fresh temporary directory next to ``dst``; on success renames it to ``dst``
  (replacing an old ``dst`` only with ``overwrite``); on failure removes it and leaves ``dst``.

  An object store (a URL) has no directory rename (a "rename" copies every object): there the
  files are written in place and a failure removes them; a run killed mid-way leaves a partial
  ``dst``, which the next write refuses to replace without ``overwrite``."""
  dst = as_path(dst)
  check_new_dir(dst, overwrite, what)
  if is_remote(dst):
    if dst.exists():
      dst.rmtree()
    make_dirs(dst)
    try:
      yield dst
    except BaseException:
      dst.rmtree(missing_ok=True)
      raise
    return
  dst.parent.mkdir(parents=True, exist_ok=True)
  sweep_leftovers(dst)
  tmp = dst.parent / temporary_name(dst.name)
  tmp.mkdir()
  try:
    yield tmp
    check_new_dir(dst, overwrite, what)  # it may have appeared meanwhile
    if dst.exists():
      old = dst.parent / temporary_name(dst.name)
      dst.rename(old)
      tmp.rename(dst)
      old.rmtree(missing_ok=True)
    else:
      tmp.rename(dst)
  except BaseException:
    tmp.rmtree(missing_ok=True)
    raise


@contextlib.contextmanager
def local_dir_for(dst: PathLike, *, overwrite: bool = False, what: str = "output"
                  ) -> Iterator[str]:
  """A local directory (a string path) to write ``dst`` with a library that only writes local
  files (a tokenizer's ``save_pretrained``): ``atomic_dir`` for a local ``dst``; for a URL, a local
  temporary directory copied to ``dst`` on success."""
  if not is_remote(dst):
    with atomic_dir(dst, overwrite=overwrite, what=what) as tmp:
      yield os.fspath(tmp)
    return
  check_new_dir(dst, overwrite, what)
  with tempfile.TemporaryDirectory(prefix="distfair-") as tmp:
    yield tmp
    copy_tree(tmp, dst)


@contextlib.contextmanager
def local_copy(src: PathLike) -> Iterator[str]:
  """``src`` as a local directory (a string path) for a library that only reads local files: the
  directory itself, or a temporary local copy of a URL's files."""
  if not is_remote(src):
    yield os.fspath(as_path(src))
    return
  with tempfile.TemporaryDirectory(prefix="distfair-") as tmp:
    copy_tree(src, tmp)
    yield tmp
