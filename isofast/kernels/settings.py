"""Launch settings of the isofast Triton kernels, chosen in one place.

Every kernel walks a ``(B, n)`` tensor in *row windows*: program ``pid`` takes row
``b = pid // nwin`` and window ``w = pid % nwin`` of ``BLOCK`` flat elements,
aligned down to a Philox counter boundary (4 elements), so a row of ``n`` elements
needs ``nwin = cdiv(n + slack, BLOCK)`` windows, where ``slack`` (0 when ``n % 4 ==
0``, else 3) covers the alignment shift of rows whose flat start ``b*n`` is not a
multiple of 4. Image rows (n a multiple of 16) have no slack, and Triton's
divisibility specialisation of ``n`` then lets the masked loads vectorise.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import triton

# A window of 2048 elements is 512 Philox counters; with 4 warps each thread
# handles 4 counters (16 elements, four 16-byte loads per tensor): enough work
# per thread to hide memory latency without spilling registers, and enough
# programs (B=256 rows of 3x64x64: 1536) to fill 132 SMs several times over.
# Not tuned on hardware yet: the benchmark is the place to revisit these.
MAX_BLOCK = 2048
MIN_BLOCK = 16           # tiny rows (2-D toy data, n = 2): one program per row
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
    clamped to [16, 2048]; warps scale with the block so each thread keeps at
    most 16 elements. Interpreter: a single small configuration.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    slack = 0 if n % 4 == 0 else 3
    if interpreting():
        block, num_warps = INTERPRET_BLOCK, 1
    else:
        block = min(max(triton.next_power_of_2(n + slack), MIN_BLOCK), MAX_BLOCK)
        num_warps = 1 if block <= 512 else 2 if block <= 1024 else 4
    return LaunchSettings(block, num_warps, triton.cdiv(n + slack, block))


SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")


def check_rows(name: str, x, like=None, like_name: str = "") -> None:
    """Host-side guard of a data operand (no device sync): a contiguous (B, n) tensor of a
    dtype the kernels are built for, with the shape and dtype of ``like`` when given.

    The ops layer has validated everything already; this catches a caller that bypasses it,
    since the kernels index raw memory as row-major (B, n). float64 raises TypeError: it
    belongs to the reference backend.
    """
    if str(x.dtype).removeprefix("torch.") not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name}: the Triton kernels take float32, bfloat16 or float16 data, got {x.dtype} "
            "(float64 runs on the reference backend)")
    if x.dim() != 2 or not x.is_contiguous():
        raise ValueError(f"{name} must be a contiguous (B, n) tensor, got shape {tuple(x.shape)} "
                         f"with strides {x.stride()}")
    if like is not None and (x.shape != like.shape or x.dtype != like.dtype or x.device != like.device):
        raise ValueError(f"{name} must match {like_name} in shape, dtype and device: got {tuple(x.shape)} "
                         f"{x.dtype} {x.device} against {tuple(like.shape)} {like.dtype} {like.device}")
