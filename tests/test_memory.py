"""memory: the resident size, its peak since a reset, and release() handing freed heap pages back."""

import sys

import pytest

from distfair_jax import memory

linux = pytest.mark.skipif(not sys.platform.startswith("linux"),
                           reason="reads /proc/self and calls glibc's malloc_trim")


@linux
def test_release_hands_back_the_pages_freed_objects_leave_in_the_heap():
  """Freed small allocations stay resident (glibc keeps them for reuse; a live one above them pins
  the heap's top) until release() trims them: what the demo does between stages."""
  chunks = [bytearray(64 * 1024) for _ in range(4096)]  # 256 MiB from malloc's heap, touched
  pin = bytearray(64 * 1024)
  held = memory.resident_bytes()
  del chunks
  freed_by_del = held - memory.resident_bytes()
  assert freed_by_del < 64 * 2**20, "nothing to release: the allocator returned the pages itself"
  released = memory.release()
  assert released > 192 * 2**20
  assert memory.resident_bytes() < held - 192 * 2**20
  assert memory.release() < 32 * 2**20  # nothing left to hand back
  del pin


@linux
def test_the_peak_counts_from_the_last_reset():
  assert memory.reset_peak()
  start = memory.peak_resident_bytes()
  assert abs(start - memory.resident_bytes()) < 16 * 2**20
  block = bytearray(128 * 2**20)  # zero-filled pages: resident once touched
  block[::4096] = b"x" * len(block[::4096])
  during = memory.peak_resident_bytes()
  assert during > start + 100 * 2**20
  del block
  assert memory.peak_resident_bytes() == pytest.approx(during, abs=8 * 2**20)  # a peak stays
  assert memory.reset_peak() and memory.peak_resident_bytes() < during - 100 * 2**20
