"""Giving memory back to the system after a large decode (issue 27).

Three chat requests of eight 12000x12000 PNGs left the daemon holding
3.3 GB after they ended: the decoded pixels are freed, but glibc keeps the
freed memory in each worker thread's malloc arena for reuse, and a daemon
that decodes big images now and then would hold its peak for good.
``malloc_trim(0)`` hands the free pages of every arena back.  It costs a
walk of the heap, so it is called only after a request decoded many pixels.
Elsewhere than glibc (musl, macOS) there is no such call, and nothing to do.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger(__name__)

#: Decoded pixels (all images of one request) from which memory is handed back afterwards.
TRIM_AFTER_PIXELS = 16_000_000


@functools.lru_cache(maxsize=1)
def _malloc_trim():  # -> the C function, or None
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def give_back() -> None:
    """Return freed heap memory to the system, where the C library can (glibc)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
