"""Keep freed tensor memory inside the process (glibc), so a forecast does not pay page faults for every buffer.

glibc serves an allocation above its mmap threshold (adaptive, from 128 KiB) with a fresh mapping and returns
it to the kernel on free; the next forecast's buffers of that size are mapped again and every page is faulted
in on first touch. Batched forecasting allocates such buffers in every step (activations of a look-back pass,
key/value caches of B series x S paths), and a page fault is costly on a virtual machine. Measured on the
2-core VM, 8 Kronos-small series batched (look-back 400, 24 steps, 8 paths): 10,000 page faults and 0.47 s
per series with glibc's defaults, 80-400 and 0.34 s per series with these settings. Forecasting one series
at a time allocates little and does not change.

The price: memory freed by a forecast stays with the process (up to `TRIM_ABOVE` of free heap) instead of
going back to the kernel, so the resident size stays at the peak of recent forecasts.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_ABOVE = 32 * 2**20  # glibc's largest allowed mmap threshold on 64-bit
TRIM_ABOVE = 2**30


@functools.cache  # once per process: every predictor built asks for it
def reuse_freed_memory() -> bool:
    """Raise glibc's mmap threshold to its maximum and keep up to 1 GiB of freed heap; False where the C
    library is not glibc (nothing changes there)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    return mallopt(M_MMAP_THRESHOLD, MMAP_ABOVE) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_ABOVE) == 1
