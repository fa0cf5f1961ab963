"""Keep the C allocator from handing the kernel back memory that the next step needs again.

On CPUs every forward allocates activations of megabytes (a layer's keys gathered for 8 rows at
528 tokens: 3.2 MB; the MLP's 1,536 wide intermediate of 16 prompts of 528 tokens: 52 MB) and
frees them microseconds later. glibc's malloc serves blocks above its mmap threshold (128 KiB at
first, adapting up to 32 MiB) with fresh mmap()s and gives memory above the heap's top back to
the kernel past its trim threshold, so each such tensor was paid again in page faults and
zeroing by the kernel. Measured on the embedded model's geometry with 2 cores: a decode step of
8 rows at 528 tokens 263 -> 104 ms, 8 prompts of 528 tokens in one forward 12.1 -> 6.4 s (mmap
threshold at its 32 MiB maximum), 16 such prompts 20.0 -> 14.9 s (no mmap at all, which the
32 MiB threshold still left to every tensor above it). vLLM's CPU backend gets the same from
preloading tcmalloc; this needs no system package.

What it costs: memory the process freed stays in its heap for the next use (up to 1 GiB of free
heap top before any goes back), so resident memory follows the largest step seen, not the
current one (docs/reliability.md has the figures). Only glibc is tuned; on any other C library
this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

# mallopt's parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4

MMAP_MAX = 0  # no block is served by its own mmap(): every one comes from a heap and is reused
TRIM_THRESHOLD = 1 << 30  # hand memory back only above a GiB of free heap top
TOP_PAD = 64 << 20  # grow the heap in steps of 64 MiB, not page by page

_tuned: bool | None = None


def keep_freed_memory() -> bool:
    """Tune glibc's malloc once per process; True if it took the settings."""
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False  # not glibc (musl, macOS): nothing to tune
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    settings = ((M_MMAP_MAX, MMAP_MAX), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD))
    _tuned = all(mallopt(option, value) == 1 for option, value in settings)
    if not _tuned:
        log.warning("mallopt refused the allocator settings; steps on CPUs may be slower")
    return _tuned
