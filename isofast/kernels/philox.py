"""The noise contract of ARCHITECTURE.md as Triton device helpers.

Element ``i`` of the draw keyed by ``(seed, offset)`` (both uint64) is the
``(i % 4)``-th normal of ``tl.randn4x(seed, offset + i // 4)``: Philox4x32-10 on
counter ``(lo32(c), hi32(c), 0, 0)`` with key ``(lo32(seed), hi32(seed))``, then
Box-Muller in float32 on the two pairs. One Philox call yields four normals and
every one of them is used: kernels lay a window of ``BLOCK`` elements out as a
``(BLOCK // 4, 4)`` block whose row ``q`` is counter ``base + q`` and whose column
is the lane ``i % 4``.

Seeds and offsets reach the primitives as the int64 bit patterns of the unsigned
values (negative Python ints for values >= 2**63). They are launched as two int32
bit patterns each (:func:`split_u64`, rejoined in-kernel by :func:`join_u64`):
int32 scalars have one type on every Triton path, whereas a Python int is typed
by its value (i32, i64 or u64, and the interpreter stores [2**31, 2**32) as
uint32 under an int64 type, which breaks reinterpretation). Device-resident keys
(sampler steps) are int64 tensors read with ``tl.load`` and reinterpreted by
:func:`as_uint64`. Counter arithmetic wraps modulo 2**64, as the contract's
uint64 does.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from isofast.kernels.settings import interpreting

_U64 = (1 << 64) - 1


def split_u64(value: int) -> tuple[int, int]:
    """(lo, hi) 32-bit halves of a uint64 (given signed or unsigned), each as an int32 bit pattern."""
    value = int(value) & _U64
    lo, hi = value & 0xFFFFFFFF, value >> 32
    return (lo - (1 << 32) if lo >= (1 << 31) else lo), (hi - (1 << 32) if hi >= (1 << 31) else hi)


@triton.jit
def join_u64(lo, hi):
    """The uint64 whose halves are the int32 bit patterns ``lo`` and ``hi``."""
    lo = tl.to_tensor(lo).to(tl.uint32, bitcast=True).to(tl.uint64)
    hi = tl.to_tensor(hi).to(tl.uint32, bitcast=True).to(tl.uint64)
    return (hi << 32) | lo


@triton.jit
def as_uint64(value):
    """Reinterpret an int64 scalar or block (a loaded device key) as uint64."""
    return value.to(tl.uint64, bitcast=True)


@triton.jit
def contract_normals(seed, offset, counter_index, lane):
    """Normals of the contract for a block of elements.

    seed, offset: uint64 scalars (the key). counter_index: int64 block of shape
    (Q, 1), ``i // 4`` of each element row. lane: int32 block of shape (1, 4),
    ``i % 4``. Returns the float32 (Q, 4) block of ``eps_i``: one Philox call per
    counter, all four of its normals used.
    """
    counter = offset + counter_index.to(tl.uint64, bitcast=True)
    z0, z1, z2, z3 = tl.randn4x(seed, counter)
    return tl.where(lane == 0, z0, tl.where(lane == 1, z1, tl.where(lane == 2, z2, z3)))


@triton.jit
def contract_ints(seed, offset, counter_index, lane):
    """The raw Philox words (as int32 bit patterns) behind :func:`contract_normals`."""
    counter = offset + counter_index.to(tl.uint64, bitcast=True)
    r0, r1, r2, r3 = tl.randint4x(seed, counter)
    r = tl.where(lane == 0, r0, tl.where(lane == 1, r1, tl.where(lane == 2, r2, r3)))
    return r.to(tl.int32, bitcast=True)


@triton.jit
def row_window(pid, n, nwin, BLOCK: tl.constexpr):
    """The window of program ``pid`` over a contiguous (B, n) tensor.

    Returns ``(b, flat, mask, counter_index, lane)``: the row, the int64 flat
    element indices of shape (BLOCK // 4, 4) (aligned down to a multiple of 4, so
    each block row is one Philox counter), the mask of those inside row ``b``, the
    (BLOCK // 4, 1) counter indices ``flat // 4`` and the (1, 4) lanes ``flat % 4``.
    All index math is int64: ``B * n`` may exceed 2**31.
    """
    b = pid // nwin
    w = pid % nwin
    row_start = b.to(tl.int64) * n
    base = (row_start // 4) * 4 + w.to(tl.int64) * BLOCK
    q = tl.arange(0, BLOCK // 4)[:, None]
    lane = tl.arange(0, 4)[None, :]
    flat = base + q * 4 + lane
    mask = (flat >= row_start) & (flat < row_start + n)
    counter_index = base // 4 + q
    return b, flat, mask, counter_index, lane


@triton.jit(do_not_specialize=["numel", "seed_lo", "seed_hi", "offset_lo", "offset_hi"])
def _contract_draw_kernel(out_ptr, ints_ptr, numel, seed_lo, seed_hi, offset_lo, offset_hi, BLOCK: tl.constexpr):
    """Debug kernel: element ``i < numel`` of the draw and its Philox word."""
    pid = tl.program_id(0)
    q = tl.arange(0, BLOCK // 4)[:, None]
    lane = tl.arange(0, 4)[None, :]
    counter_index = pid.to(tl.int64) * (BLOCK // 4) + q
    flat = counter_index * 4 + lane
    mask = flat < numel
    seed_u = join_u64(seed_lo, seed_hi)
    offset_u = join_u64(offset_lo, offset_hi)
    tl.store(out_ptr + flat, contract_normals(seed_u, offset_u, counter_index, lane), mask=mask)
    tl.store(ints_ptr + flat, contract_ints(seed_u, offset_u, counter_index, lane), mask=mask)



def contract_draw(seed: int, offset: int, numel: int, device: torch.device | str = "cuda"):
    """Debug helper: ``(normals, words)`` of the draw keyed by ``(seed, offset)``.

    normals: float32 (numel,), the contract's eps; words: int32 (numel,), the
    Philox output word each normal's lane came from (bit pattern of the uint32),
    so tests compare the integers exactly and the normals to a few ulp.
    """
    normals = torch.empty(numel, dtype=torch.float32, device=device)
    words = torch.empty(numel, dtype=torch.int32, device=device)
    if numel:
        block = 32 if interpreting() else 1024
        _contract_draw_kernel[(triton.cdiv(numel, block),)](
            normals, words, numel, *split_u64(seed), *split_u64(offset), BLOCK=block,
            num_warps=1 if interpreting() else 4)
    return normals, words
