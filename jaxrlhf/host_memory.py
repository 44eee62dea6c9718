"""Host memory that stays mapped: freed blocks are kept for the next call instead of going back to the kernel.

XLA's CPU runtime allocates each call's temporaries with ``malloc`` (one block for most of them: 729 MB
for the update of ``benchmarks/ppo_iteration.py``'s tiny preset) and frees them when the call ends. glibc
serves a block that large with a fresh ``mmap`` and unmaps it on ``free`` (always, from a worker thread's
arena, whatever ``M_MMAP_MAX`` says), so every call faults its temporaries in again, 4 KiB at a time, each
page zeroed by the kernel first: ~196 000 page faults per call of that update. With one arena, no ``mmap``
for ``malloc`` and the heap trimmed only past 2 GiB of free space, later calls reuse the pages of the first
(measured: 0 faults per update call after the first; the whole benchmark process 2.26 M → 0.45 M faults,
14 → 7 s of system time; the update 6–14% faster in three alternated pairs). The process keeps its peak
footprint instead of returning it and faulting it in again, a trade that suits a process repeating the
same steps.

The ``jaxrlhf`` console script and the benchmarks apply it at start-up, before the runtime's threads
exist; a library user calls :func:`retain_freed_memory` as early. Only glibc has these knobs: elsewhere, and
where the environment sets glibc's malloc variables itself (``MALLOC_ARENA_MAX``, ``MALLOC_MMAP_MAX_``,
``MALLOC_TRIM_THRESHOLD_``, ``GLIBC_TUNABLES`` with ``glibc.malloc``), it changes nothing and returns
``False``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
# Free memory at the top of the heap goes back to the kernel only above this (mallopt takes an int: 2 GiB).
TRIM_THRESHOLD = 2**31 - 1


@functools.cache
def retain_freed_memory() -> bool:
    """``mallopt``: one arena (``M_ARENA_MAX`` 1: a thread's arena would ``mmap`` large blocks anyway),
    every block from the heap (``M_MMAP_MAX`` 0) and the heap trimmed only past 2 GiB of free space
    (``M_TRIM_THRESHOLD``); once per process. Returns whether glibc accepted all three; ``False`` on other
    C libraries and platforms and when the environment chose (see the module docstring)."""
    if not sys.platform.startswith("linux") or user_chose_malloc_settings(os.environ):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return all([bool(mallopt(parameter, value)) for parameter, value in settings])


GLIBC_MALLOC_VARIABLES = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")


def user_chose_malloc_settings(environ) -> bool:
    """Whether ``environ`` sets glibc's malloc behaviour itself (then it wins over ours)."""
    return any(name in environ for name in GLIBC_MALLOC_VARIABLES) or "glibc.malloc" in environ.get(
        "GLIBC_TUNABLES", "")
