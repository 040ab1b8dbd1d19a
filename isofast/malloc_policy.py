"""Keep the memory a process frees, instead of handing it back to the OS (glibc only).

glibc serves a large allocation with mmap, or returns the top of its heap to the OS on free, once a block
exceeds its adaptive thresholds; the next allocation of that size then touches fresh pages, one page fault
per 4 KiB. The stacked ensemble's training step allocates its activations and gradients anew every step
(buffers of 2-5 MB at the paper's 72 members): with glibc's defaults that was ~2,000 page faults and
~2.5 ms of a ~34 ms step (measured in one process, 2 threads, same state, before and after this call).
Fixed thresholds keep those buffers in the heap. A process-wide setting: the commands that run the
ensemble call it (`isofast toy2d`), the library does not.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

__all__ = ["retain_freed_memory", "set_malloc_thresholds"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def set_malloc_thresholds(mmap_threshold: int | None = None, trim_threshold: int | None = None) -> bool:
    """Fix glibc's mmap and/or trim threshold (bytes; None leaves one as it is; a fixed value also turns off
    glibc's adaptive adjustment of both); returns whether every given one applied (False where the C library
    is not glibc)."""
    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 (only glibc has it; musl's mallopt is a no-op)
    except (OSError, AttributeError):
        return False
    settings = [(_M_MMAP_THRESHOLD, mmap_threshold), (_M_TRIM_THRESHOLD, trim_threshold)]
    return all(bool(libc.mallopt(param, int(value))) for param, value in settings if value is not None)


def retain_freed_memory(mmap_threshold: int = 64 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Serve allocations below ``mmap_threshold`` bytes from the heap and keep up to ``trim_threshold``
    bytes of freed heap; returns whether it applied (False where the C library is not glibc)."""
    return set_malloc_thresholds(mmap_threshold, trim_threshold)
