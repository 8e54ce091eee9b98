"""Fault in the pages of CPU tensors ahead of their first write, from another thread.

A CPU rank pool is allocated without being touched (see `lora_batch`), so the first adapter
copied into an entry pays a page fault per 4 KiB of it on the engine thread. In a virtual machine
that is slow: a rank-64 q,k,v,o adapter (29.5 MB) took 6-9 ms to copy into fresh memory against
1.2 ms into memory touched before, and far longer while the adapter reader competed for the
cores. The reader thread therefore asks the kernel to populate the entry an adapter will take
(`madvise(MADV_POPULATE_WRITE)`, Linux 5.14+) before the engine copies into it.

Populating never changes a page that is already present, so it is safe while another thread
reads or writes the same memory: an absent page becomes a zero page, which is what it would
read as anyway.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
import sys

import torch

MADV_POPULATE_WRITE = 23  # linux/mman.h
_PAGE = mmap.PAGESIZE

_supported = sys.platform.startswith("linux")


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise.restype = ctypes.c_int
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    return libc


def populate(tensors: list[torch.Tensor]) -> bool:
    """Fault in every page holding a byte of these contiguous CPU tensors (others are skipped).
    Returns False where the kernel cannot (not Linux, or older than 5.14): then the pages fault on
    first write as before, and later calls return False at once."""
    global _supported
    if not _supported:
        return False
    for t in tensors:
        if t.device.type != "cpu" or not t.is_contiguous() or t.numel() == 0:
            continue
        start, end = _pages_of(t)
        if _libc().madvise(start, end - start, MADV_POPULATE_WRITE) != 0:
            _supported = False
            return False
    return True


def resident_fraction(t: torch.Tensor) -> float:
    """The fraction of the pages holding contiguous CPU tensor `t` that are in memory (mincore)."""
    start, end = _pages_of(t)
    pages = (end - start) // _PAGE
    vec = (ctypes.c_ubyte * pages)()
    if _libc().mincore(start, end - start, vec) != 0:
        raise OSError(ctypes.get_errno(), "mincore failed")
    return sum(b & 1 for b in vec) / pages


def _pages_of(t: torch.Tensor) -> tuple[int, int]:
    """The page-aligned address range [start, end) holding every byte of contiguous tensor `t`."""
    start = t.data_ptr() // _PAGE * _PAGE
    end = -(-(t.data_ptr() + t.numel() * t.element_size()) // _PAGE) * _PAGE
    return start, end
