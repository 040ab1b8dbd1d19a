"""Triton backend of isofast: the five kernel primitives of ``isofast.ops.backends``.

    q_sample(x0, t, sqrt_ab, sqrt_1mab, e, seed, offset) -> x_t
    iso_sums(p, e, seed, offset) -> (sse, ssq)
    iso_grad(p, e, seed, offset, c1, c2) -> g
    ddpm_step(x, eps_pred, t, table, e, key, clip_x0) -> x_prev
    ddim_step(x, eps_pred, t, t_prev, alphas_cumprod, eta, e, key, clip_x0) -> x_prev

Inputs are validated by ``isofast.ops``; data is contiguous (B, n) float32,
bfloat16 or float16 (float64 raises TypeError: the ops layer routes it to the
reference), math runs in float32. Noise not given as a tensor is generated in the
kernels by the contract of ARCHITECTURE.md (:mod:`isofast.kernels.philox`).
Kernels run on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import os

from isofast.kernels.iso_loss import iso_grad, iso_sums
from isofast.kernels.q_sample import q_sample
from isofast.kernels.steps import ddim_step, ddpm_step

__all__ = ["available", "ddim_step", "ddpm_step", "iso_grad", "iso_sums", "q_sample"]


def available(name: str = "triton") -> tuple[bool, str]:
    """``(ok, reason)``: whether these kernels can run here as backend ``name``."""
    if name != "triton":
        return False, f"isofast.kernels implements the 'triton' backend, not {name!r}"
    import torch
    import triton

    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, f"triton {triton.__version__} interpreter (TRITON_INTERPRET=1, CPU tensors)"
    if not torch.cuda.is_available():
        return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU)"
    try:
        from triton.runtime import driver

        target = driver.active.get_current_target()
    except Exception as exc:  # a broken driver or toolchain must read as "not available"
        return False, f"triton {triton.__version__} cannot target the GPU: {type(exc).__name__}: {exc}"
    return True, f"triton {triton.__version__} on {torch.cuda.get_device_name()} ({target.backend})"
