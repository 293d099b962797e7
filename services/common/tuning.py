"""Process tuning the storage pipeline needs, and giving memory back after a burst (``release_memory``).

glibc serves allocations above a dynamic threshold (128 KiB at start) with
fresh ``mmap`` calls and returns them on free, so every multi-MiB chunk,
ciphertext and fragment costs page faults and zeroing. Measured here: pyeclib
encodes 1 MiB at 0.76 GB/s in a fresh process against 3-4.4 GB/s once
allocations come from the heap. Raising ``M_MMAP_THRESHOLD`` and
``M_TRIM_THRESHOLD`` keeps chunk buffers in the heap and reuses them. The
cost is that up to ``trim`` bytes of freed heap stay mapped (bounded, since
the pipeline holds a fixed number of chunks).

``M_ARENA_MAX`` is capped at 2: every worker thread that touches a chunk would
otherwise get an arena of its own, each keeping freed chunk buffers mapped
(measured on 1 GiB through the engine: peak RSS 162 MiB with glibc's default
arena count, 90-119 MiB with two, at the same throughput).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
from collections.abc import Callable
from typing import cast

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
ARENA_MAX = 2
# glibc caps M_MMAP_THRESHOLD at 32 MiB on 64-bit (HEAP_MAX_SIZE / 2).
MMAP_THRESHOLD = 32 * 1024 * 1024
TRIM_THRESHOLD = 64 * 1024 * 1024

_done = False


def tune_malloc() -> bool:
    """Apply the thresholds once per process; False when not glibc or disabled.

    ``GRIDSTOR_MALLOC_TUNE=0`` turns it off (the benchmark uses it to show the
    difference).
    """
    global _done
    if _done:
        return True
    if os.environ.get("GRIDSTOR_MALLOC_TUNE", "1") == "0":
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc (musl has no mallopt)
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = all(
        mallopt(param, value) == 1
        for param, value in (
            (M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
            (M_ARENA_MAX, ARENA_MAX),
        )
    )
    if not ok:
        log.warning("mallopt refused the chunk-buffer thresholds; throughput may drop")
    _done = ok
    return ok


def release_memory() -> bool:
    """Hand freed heap memory back to the system now (glibc ``malloc_trim(0)``); False when not glibc.

    The thresholds above keep freed chunk buffers mapped for reuse; after a burst (100
    concurrent downloads) that is hundreds of MiB nobody uses. ``malloc_trim`` returns
    the free pages of every arena, not only the top of the heap. Called when a process's
    streams have all ended (services/common/capacity.py).
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    return bool(trim(0))


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        fn = ctypes.CDLL(None).malloc_trim  # the process's own libc: no library search
    except (OSError, AttributeError):
        return None  # not glibc
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return cast(Callable[[int], int], fn)
