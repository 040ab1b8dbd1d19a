"""Backend "cpu" and "cuda": the kernel primitives of the compiled extension ``isofast._C``.

The extension registers the ops ``torch.ops.isofast_C.*`` (schemas in csrc/ops.cpp) with a
CPU implementation (csrc/cpu/) and, when built with CUDA, a CUDA one (csrc/cuda/); the
dispatcher picks by the device of the tensors. This module only forwards the already
validated arguments of ``isofast.ops`` (see ``isofast.ops.backends`` for the contract) and
registers fake implementations so ``torch.compile`` can trace through the ops.

Shapes: data ``(B, n)`` contiguous; ``t``/``t_prev`` int64 ``(B,)``; tables float32
(float64 for float64 data). ``seed``/``offset`` are int64 bit patterns of uint64 values.

Materialise-once on the CPU. On a GPU regenerating eps is free (Philox hides under the memory
traffic); on a CPU it is not: one generation costs several reads of the stored eps. Measured on
2 cores with AVX-512, B=64 x 3072 float32 (medians): q_sample/iso_sums/iso_grad regenerating
0.12/0.13/0.12 ms (0.37 ms), vs q_sample storing eps 0.14 ms then reading it 0.03/0.03 ms (0.20 ms).
So for CPU data, ``q_sample`` with a key also returns the eps it drew (``isofast_C::q_sample_noise``,
one pass) and keeps it here, keyed by (seed, offset, shape); ``iso_sums``/``iso_grad`` with the same
key read it instead of regenerating, and ``iso_sums`` with a key q_sample did not keep (the loss on
its own) draws and keeps it itself. A draw is stored in float32 (float64 for float64 data; 16-bit
data reads float32 noise, never a rounded copy): the very floats the kernels would regenerate, so
no number changes. At most ``_EPS_CACHE_SIZE`` draws are kept; ``clear_noise_cache()`` frees them.
"""
from __future__ import annotations

from collections import OrderedDict

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
        return True, f"compiled C++ kernels (isofast._C; noise generator: {_C.noise_isa()})"
    if name == "cuda":
        if not _C.has_cuda():
            return False, "isofast._C was built without its CUDA kernels (ISOFAST_CUDA=0, no nvcc, or no GPU at build time)"
        if not torch.cuda.is_available():
            return False, "isofast._C has CUDA kernels but no CUDA GPU is available"
        return True, "compiled CUDA kernels (isofast._C)"
    return False, f"unknown compiled backend {name!r}"


_EPS_CACHE_SIZE = 2  # a training step needs one draw; two leave room for an interleaved eval call
_eps_cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()


def _materialises(x: torch.Tensor) -> bool:
    return x.device.type == "cpu"


def _noise_dtype(x: torch.Tensor) -> torch.dtype:
    """How a draw for x is stored: float64 for float64 data, else float32 (the generator's own values)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _cache_key(x: torch.Tensor, seed: int, offset: int) -> tuple:
    return (seed, offset, tuple(x.shape))


def _cached_eps(p: torch.Tensor, e: torch.Tensor | None, seed: int, offset: int) -> torch.Tensor | None:
    """The explicit noise, else the stored draw (seed, offset) when one was kept, else None.

    A draw kept for data of another dtype (float32 x0, bfloat16 eps_pred under autocast) is
    converted, exactly: it holds float32 values either way."""
    if e is not None or not _materialises(p):
        return e
    eps = _eps_cache.get(_cache_key(p, seed, offset))
    return None if eps is None else eps.to(_noise_dtype(p))


def _keep(key: tuple, eps: torch.Tensor) -> None:
    _eps_cache[key] = eps
    _eps_cache.move_to_end(key)
    while len(_eps_cache) > _EPS_CACHE_SIZE:
        _eps_cache.popitem(last=False)


def clear_noise_cache() -> None:
    """Drop the eps draws kept by the CPU kernels (they are only a speed-up)."""
    _eps_cache.clear()


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
    if e is None and _materialises(x0):
        x_t, eps = torch.ops.isofast_C.q_sample_noise(x0, t, sqrt_ab, sqrt_1mab, seed, offset)
        _keep(_cache_key(x0, seed, offset), eps)
        return x_t
    return torch.ops.isofast_C.q_sample(x0, t, sqrt_ab, sqrt_1mab, e, seed, offset)


def iso_sums(p: torch.Tensor, e: torch.Tensor | None, seed: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sse, ssq), float32 (B,) (float64 for float64): sum_j (p - eps)^2 and sum_j p^2 per row.

    A draw that q_sample did not keep (the loss called on its own) is materialised here, once,
    for the backward's ``iso_grad`` to read: one generation instead of two.
    """
    eps = _cached_eps(p, e, seed, offset)
    if eps is None and _materialises(p):
        eps = torch.ops.isofast_C.philox_randn(p, seed, offset).view(p.shape).to(_noise_dtype(p))
        _keep(_cache_key(p, seed, offset), eps)
    return torch.ops.isofast_C.iso_sums(p, eps, seed, offset)


def iso_grad(
    p: torch.Tensor, e: torch.Tensor | None, seed: int, offset: int, c1: torch.Tensor, c2: torch.Tensor
) -> torch.Tensor:
    """g[b, j] = c1[b] (p[b, j] - eps[b, j]) + c2[b] p[b, j]; (B, n) of p's dtype."""
    return torch.ops.isofast_C.iso_grad(p, _cached_eps(p, e, seed, offset), seed, offset, c1, c2)


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

    @torch.library.register_fake("isofast_C::q_sample_noise")
    def _(x0, t, sqrt_ab, sqrt_1mab, seed, offset):
        return torch.empty_like(x0), torch.empty_like(x0, dtype=_acc_dtype(x0.dtype))

    @torch.library.register_fake("isofast_C::iso_sums")
    def _(p, e, seed, offset):
        acc = _acc_dtype(p.dtype)
        return p.new_empty((p.shape[0],), dtype=acc), p.new_empty((p.shape[0],), dtype=acc)

    @torch.library.register_fake("isofast_C::iso_grad")
    def _(p, e, seed, offset, c1, c2):
        return torch.empty_like(p)

    @torch.library.register_fake("isofast_C::iso_loss_tail")
    def _(sse, ssq, n, weights, iso_lambda, iso_mode, reduction):
        per = (sse.shape[0],) if reduction == "none" else ()
        loss, mse, iso = (sse.new_empty(per) for _ in range(3))
        return loss, mse, iso, sse.new_empty(()), torch.empty_like(sse), torch.empty_like(sse), torch.empty_like(sse)

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
