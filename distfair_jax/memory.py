"""The process's host memory: how much is resident (``resident_bytes``), and handing back what
finished work left behind (``release``).

A long process that trains and evaluates one model after another (the demo: dozens of stages on a
real model) frees each stage's arrays, but glibc's allocator keeps the freed pages in its arenas
(XLA's CPU buffers and compile scratch come from many threads, each with an arena); on
SmolLM2-135M a finished SFT stage left 3.4 GiB resident of which 2.6 GiB were such free pages, and
two demos side by side outgrew a 24 GiB machine after about ten stages. ``release`` returns them to
the system (``malloc_trim``) between stages.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import os
import resource


def resident_bytes() -> int:
  """The process's resident set size now, in bytes (Linux ``/proc/self/statm``; elsewhere the
  peak, ``getrusage``)."""
  try:
    with open("/proc/self/statm", encoding="ascii") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  except OSError:
    return peak_resident_bytes()


def peak_resident_bytes() -> int:
  """The largest resident set size since ``reset_peak`` (or since the process began), in bytes
  (Linux ``VmHWM``; elsewhere the process's peak, ``getrusage``)."""
  try:
    with open("/proc/self/status", encoding="ascii") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak if os.uname().sysname == "Darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def reset_peak() -> bool:
  """Starts ``peak_resident_bytes`` afresh from the resident size now (Linux: ``clear_refs``);
  False where the system cannot (the peak then stays the process's)."""
  try:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
      f.write("5")
    return True
  except OSError:
    return False


@functools.cache
def _malloc_trim():
  """glibc's ``malloc_trim`` (None where the C library has none: musl, macOS)."""
  name = ctypes.util.find_library("c")
  try:
    return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
  except OSError:
    return None


def release() -> int:
  """Collects Python's garbage and returns the allocator's free pages to the system; returns the
  bytes no longer resident (0 where there is nothing to trim or no ``malloc_trim``). Call it
  after a piece of work whose arrays are gone, not inside a jitted loop."""
  before = resident_bytes()
  gc.collect()
  trim = _malloc_trim()
  if trim is not None:
    trim(0)
  return max(before - resident_bytes(), 0)
