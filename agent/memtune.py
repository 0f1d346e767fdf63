"""One adapter into the C library's allocator, for commands that must keep a bounded RSS.

glibc serves an allocation of 128 KiB or more with its own mmap, returned to the system on
free, but after freeing such a block it raises that threshold (up to 32 MiB): later 16 MiB
buffers (restore's chunks and manifests) then come from per-thread heaps that keep freed
memory, and RSS grows with the number of threads that ever held one. Fixing the threshold
keeps large buffers in mmaps of their own, so RSS follows what is really held.
"""

from __future__ import annotations

import ctypes

_M_MMAP_THRESHOLD = -3  # <malloc.h>
MMAP_THRESHOLD = 1 << 20


def release_large_buffers(threshold: int = MMAP_THRESHOLD) -> bool:
    """Serve allocations of `threshold` bytes or more by mmap, always; False where the C
    library has no mallopt (not glibc), which only costs memory, never correctness."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold))
