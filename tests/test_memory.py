"""memory: the resident size, its peak since a reset, and release() handing freed heap pages back.

Each scenario runs in a fresh interpreter: the test process's own heap (what earlier tests left,
a library's allocator settings) would decide where its allocations land."""

import json
import subprocess
import sys

import pytest

linux = pytest.mark.skipif(not sys.platform.startswith("linux"),
                           reason="reads /proc/self and calls glibc's malloc_trim")
MIB = 2**20


def _run(body: str) -> dict:
  code = ("import json\nfrom distfair_jax import memory\nout = {}\n" + body +
          "\nprint(json.dumps(out))")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                        check=True)
  return json.loads(proc.stdout.splitlines()[-1])


@linux
def test_release_hands_back_the_pages_freed_objects_leave_in_the_heap():
  """Freed small allocations between live ones stay resident (glibc keeps them for reuse and
  trims only the heap's top) until release() hands them back: what the demo does between
  stages."""
  out = _run("""
chunks = [bytearray(64 * 1024) for _ in range(4096)]  # 256 MiB from malloc's heap, touched
kept = chunks[::64]  # one chunk in 64 stays: the freed ones lie between live ones
out["held"] = memory.resident_bytes()
del chunks
out["after_del"] = memory.resident_bytes()
out["released"] = memory.release()
out["after_release"] = memory.resident_bytes()
out["again"] = memory.release()
""")
  assert out["held"] - out["after_del"] < 64 * MIB, "the allocator returned the pages itself"
  assert out["released"] > 192 * MIB
  assert out["after_release"] < out["held"] - 192 * MIB
  assert out["again"] < 32 * MIB  # nothing left to hand back


@linux
def test_the_peak_counts_from_the_last_reset():
  out = _run("""
out["reset"] = memory.reset_peak()
out["start"], out["resident"] = memory.peak_resident_bytes(), memory.resident_bytes()
block = bytearray(128 * 2**20)
block[::4096] = b"x" * len(block[::4096])  # every page touched: resident
out["during"] = memory.peak_resident_bytes()
del block
out["after"] = memory.peak_resident_bytes()
out["reset_again"] = memory.reset_peak()
out["fresh"] = memory.peak_resident_bytes()
""")
  assert out["reset"] and out["reset_again"]
  assert abs(out["start"] - out["resident"]) < 16 * MIB
  assert out["during"] > out["start"] + 100 * MIB
  assert out["after"] == pytest.approx(out["during"], abs=8 * MIB)  # a peak stays
  assert out["fresh"] < out["during"] - 100 * MIB
