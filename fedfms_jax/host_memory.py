"""Keep freed host memory in the process for reuse (glibc's malloc on Linux).

XLA:CPU allocates a program's temporaries afresh at every execution. glibc serves each
large buffer with a fresh mmap and unmaps it on free, so every federated round faults
in, and the kernel zeroes, gigabytes of new pages: about 1.9 M page faults and 5.5 s of
system time per ViT-B FedSAM round on a 2-core CPU (BENCHMARKS.md). Serving every
allocation from malloc's heap and never trimming it back makes later rounds reuse the
same pages. The process then keeps its peak host memory until it exits, which a
training or benchmark process reaches anyway.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["retain_freed_memory"]

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_MAX = -4


def retain_freed_memory() -> bool:
    """Switch glibc's malloc to reuse freed memory; False where that is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # glibc only: musl's mallopt ignores these
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # No mmap-served chunks, and -1 (as size_t, the maximum) turns trimming off.
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, -1))
