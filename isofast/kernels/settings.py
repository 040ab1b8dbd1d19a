"""Launch settings of the isofast Triton kernels, chosen in one place.

Every kernel walks a ``(B, n)`` tensor in *row windows*: program ``pid`` takes row
``b = pid // nwin`` and window ``w = pid % nwin`` of ``BLOCK`` flat elements,
aligned down to a Philox counter boundary (4 elements), so a row of ``n`` elements
needs ``nwin = cdiv(n + 3, BLOCK)`` windows (the ``+ 3`` covers the alignment
shift of rows whose flat start ``b*n`` is not a multiple of 4).
"""
from __future__ import annotations

import os
from typing import NamedTuple

import triton

# A window of 4096 elements is 1024 Philox counters; with 8 warps each thread
# handles 4 counters (16 elements, four 16-byte vector loads): enough work per
# thread to hide memory latency on H100-class parts without spilling registers.
MAX_BLOCK = 4096
MIN_BLOCK = 128          # one counter per lane of one warp
INTERPRET_BLOCK = 32     # small: n <= 70 in the tests spans several windows


class LaunchSettings(NamedTuple):
    """``BLOCK`` elements per program (a power of two, >= 4), its warps, windows per row."""

    block: int
    num_warps: int
    nwin: int


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def calculate_settings(n: int) -> LaunchSettings:
    """Block size and warps for rows of ``n`` elements (``n >= 1``).

    GPU: the smallest power of two covering a row (plus its alignment slack),
    clamped to [128, 4096]; warps scale with the block so each thread keeps
    4-16 elements. Interpreter: a single small configuration.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if interpreting():
        block, num_warps = INTERPRET_BLOCK, 1
    else:
        block = min(max(triton.next_power_of_2(n + 3), MIN_BLOCK), MAX_BLOCK)
        num_warps = 1 if block <= 128 else 2 if block <= 512 else 4 if block <= 2048 else 8
    return LaunchSettings(block, num_warps, triton.cdiv(n + 3, block))


SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")


def check_dtype(x, name: str) -> None:
    """Refuse data dtypes the kernels are not built for: float64 belongs to the reference."""
    if str(x.dtype).removeprefix("torch.") not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name}: the Triton kernels take float32, bfloat16 or float16 data, got {x.dtype} "
            "(float64 runs on the reference backend)")
