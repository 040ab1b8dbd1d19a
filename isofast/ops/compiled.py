"""Backend "cpu" and "cuda": the kernel primitives of the compiled extension ``isofast._C``.

The extension registers the ops ``torch.ops.isofast_C.*`` (schemas in csrc/ops.cpp) with a
CPU implementation (csrc/cpu/) and, when built with CUDA, a CUDA one (csrc/cuda/); the
dispatcher picks by the device of the tensors. This module only forwards the already
validated arguments of ``isofast.ops`` (see ``isofast.ops.backends`` for the contract) and
registers fake implementations so ``torch.compile`` can trace through the ops.

Shapes: data ``(B, n)`` contiguous; ``t``/``t_prev`` int64 ``(B,)``; tables float32
(float64 for float64 data). ``seed``/``offset`` are int64 bit patterns of uint64 values.
"""
from __future__ import annotations

import torch

try:
    from isofast import _C  # loading the library registers torch.ops.isofast_C
except ImportError as exc:  # pure-Python install, or a build for another torch
    _C = None
    _IMPORT_ERROR = f"isofast._C is not built or does not load ({exc}); build it with `pip install --no-build-isolation .`"
else:
    _IMPORT_ERROR = ""


def available(name: str) -> tuple[bool, str]:
    """(usable, reason) of backend ``name`` ("cpu" or "cuda") on this machine."""
    if _C is None:
        return False, _IMPORT_ERROR
    if name == "cpu":
        return True, "compiled C++ kernels (isofast._C)"
    if name == "cuda":
        if not _C.has_cuda():
            return False, "isofast._C was built without its CUDA kernels (ISOFAST_CUDA=0, no nvcc, or no GPU at build time)"
        if not torch.cuda.is_available():
            return False, "isofast._C has CUDA kernels but no CUDA GPU is available"
        return True, "compiled CUDA kernels (isofast._C)"
    return False, f"unknown compiled backend {name!r}"


def q_sample(
    x0: torch.Tensor,
    t: torch.Tensor,
    sqrt_ab: torch.Tensor,
    sqrt_1mab: torch.Tensor,
    e: torch.Tensor | None,
    seed: int,
    offset: int,
) -> torch.Tensor:
    """x_t[b] = sqrt_ab[t[b]] * x0[b] + sqrt_1mab[t[b]] * eps[b]; (B, n) of x0's dtype."""
    return torch.ops.isofast_C.q_sample(x0, t, sqrt_ab, sqrt_1mab, e, seed, offset)


def iso_sums(p: torch.Tensor, e: torch.Tensor | None, seed: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sse, ssq), float32 (B,) (float64 for float64): sum_j (p - eps)^2 and sum_j p^2 per row."""
    return torch.ops.isofast_C.iso_sums(p, e, seed, offset)


def iso_grad(
    p: torch.Tensor, e: torch.Tensor | None, seed: int, offset: int, c1: torch.Tensor, c2: torch.Tensor
) -> torch.Tensor:
    """g[b, j] = c1[b] (p[b, j] - eps[b, j]) + c2[b] p[b, j]; (B, n) of p's dtype."""
    return torch.ops.isofast_C.iso_grad(p, e, seed, offset, c1, c2)


def ddpm_step(
    x: torch.Tensor,
    eps_pred: torch.Tensor,
    t: torch.Tensor,
    table: torch.Tensor,
    e: torch.Tensor | None,
    key: torch.Tensor | None,
    clip_x0: bool,
) -> torch.Tensor:
    """x_prev = table[2,t] x0 + table[3,t] x + [t > 0] table[4,t] z, x0 = table[0,t] x - table[1,t] eps_pred."""
    return torch.ops.isofast_C.ddpm_step(x, eps_pred, t, table, e, key, bool(clip_x0))


def ddim_step(
    x: torch.Tensor,
    eps_pred: torch.Tensor,
    t: torch.Tensor,
    t_prev: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    eta: float,
    e: torch.Tensor | None,
    key: torch.Tensor | None,
    clip_x0: bool,
) -> torch.Tensor:
    """x_prev = sqrt(ab_prev) x0 + sqrt(max(1 - ab_prev - sigma^2, 0)) eps_pred + sigma z (backends.py)."""
    return torch.ops.isofast_C.ddim_step(x, eps_pred, t, t_prev, alphas_cumprod, float(eta), e, key, bool(clip_x0))


def _register_fakes() -> None:
    """Shape/dtype functions of the ops, so torch.compile and FakeTensor tracing see through them."""

    def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
        return torch.float64 if dtype == torch.float64 else torch.float32

    @torch.library.register_fake("isofast_C::q_sample")
    def _(x0, t, sqrt_ab, sqrt_1mab, e, seed, offset):
        return torch.empty_like(x0)

    @torch.library.register_fake("isofast_C::iso_sums")
    def _(p, e, seed, offset):
        acc = _acc_dtype(p.dtype)
        return p.new_empty((p.shape[0],), dtype=acc), p.new_empty((p.shape[0],), dtype=acc)

    @torch.library.register_fake("isofast_C::iso_grad")
    def _(p, e, seed, offset, c1, c2):
        return torch.empty_like(p)

    @torch.library.register_fake("isofast_C::ddpm_step")
    def _(x, eps_pred, t, table, e, key, clip_x0):
        return torch.empty_like(x)

    @torch.library.register_fake("isofast_C::ddim_step")
    def _(x, eps_pred, t, t_prev, alphas_cumprod, eta, e, key, clip_x0):
        return torch.empty_like(x)

    @torch.library.register_fake("isofast_C::philox_bits")
    def _(like, seed, offset):
        return like.new_empty(((like.numel() + 3) // 4, 4), dtype=torch.int32)

    @torch.library.register_fake("isofast_C::philox_randn")
    def _(like, seed, offset, scalar=False):
        return like.new_empty((like.numel(),), dtype=torch.float32)


if _C is not None:
    _register_fakes()
