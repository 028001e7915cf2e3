"""The C allocator, tuned for a transfer's large short-lived buffers.

A transfer allocates and frees a few hundred KiB many times a second (sealed records, a
WebSocket frame's masked copy, a gathered write). glibc's defaults hand such blocks back to
the kernel as soon as they are free, so the next one is fresh pages: a page fault and a
zeroed page for every 4 KiB moved. Over WebSocket that was most of the sender's system time
(2.4 of its 4.2 CPU s/GiB). Keeping freed memory for reuse costs nothing a transfer does not
already hold at its peak, and a peer is a short-lived process.
"""

from __future__ import annotations

import ctypes
import sys

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
KEEP = 16 * 1024 * 1024
"""Bytes: blocks below this come from the heap, and this much free heap is kept."""


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed blocks for reuse; False where there is no such allocator."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # Both or neither: a fixed mmap threshold also stops glibc from moving it on its own.
    return bool(mallopt(_M_MMAP_THRESHOLD, KEEP)) and bool(mallopt(_M_TRIM_THRESHOLD, KEEP))
