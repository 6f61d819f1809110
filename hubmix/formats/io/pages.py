"""Faulting in the pages of a memory map ahead of use, from a thread that never touches them (Linux only).

MADV_POPULATE_READ (Linux 5.14) maps a range's pages, reading from the disk what is not in the page cache; called
through ctypes, it runs without the GIL. Elsewhere these are no-ops: prefetching is only an optimisation.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any, Callable

_MADV_POPULATE_READ = 22
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
STEP = 64 << 20  # bytes per call when populating a whole mapping: a cancel is seen within one step
try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _madvise = _libc.madvise
    _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
except (OSError, AttributeError):  # not Linux/glibc
    _madvise = None


def populate(address: int, length: int) -> None:
    """Map the pages of [address, address + length); errors (an old kernel) are harmless."""
    if _madvise is None or length <= 0:
        return
    base = address - address % PAGE
    _madvise(base, address + length - base, _MADV_POPULATE_READ)


def populate_mapping(mm: Any, cancelled: Callable[[], bool] = lambda: False) -> None:
    """Populate a whole writable mmap (hubmix maps inputs copy-on-write), step by step until `cancelled()`."""
    if _madvise is None or len(mm) == 0:
        return
    anchor = ctypes.c_char.from_buffer(mm)
    address = ctypes.addressof(anchor)
    del anchor  # the address stays valid while the map is open; the export must not keep it from closing
    for start in range(0, len(mm), STEP):
        if cancelled():
            return
        populate(address + start, min(STEP, len(mm) - start))
