"""Give freed large buffers back to the operating system at once (glibc on Linux).

glibc serves large allocations with mmap, but raises that threshold dynamically (up to
32 MiB) each time such a block is freed; from then on the sliding window's per-window
tensors (10-40 MB) come from the heap, whose freed space is often not returned, so the
process's resident memory keeps the high-water mark of every window. A fixed threshold keeps
every allocation of ``threshold_bytes`` or more on mmap, returned to the OS when freed.
Measured on a 512x512x400 CT (benchmarks/RESULTS.md): see the memory section. The CLI calls
this once per process; the library leaves the host process's allocator alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3  # glibc malloc.h
DEFAULT_THRESHOLD_BYTES = 4 << 20


def return_large_frees_to_os(threshold_bytes: int = DEFAULT_THRESHOLD_BYTES) -> bool:
    """Set glibc's mmap threshold to ``threshold_bytes`` (fixed); True when it was applied.

    Anything other than Linux with glibc (macOS, Windows, musl) is left alone (False).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, int(threshold_bytes)) == 1
