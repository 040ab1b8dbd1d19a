"""Backends "cpu" and "cuda": the compiled extension ``isofast._C``.

Loading the library registers the ops ``torch.ops.isofast_C.*`` (schemas in csrc/ops.cpp) with CPU
kernels (csrc/cpu/), CUDA kernels when built with them (csrc/cuda/), and the autograd of the
differentiable ones (csrc/autograd.cpp); the dispatcher picks the kernel by the tensors' device.
Their fake (shape) functions are registered in `isofast.ops`, one module per op; the ones of the
CPU-only helper ops are here.
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
        return True, (f"compiled C++ kernels (isofast._C; noise generator: {_C.noise_isa()}; "
                      f"ensemble sampling forward: {_C.sampler_isa()})")
    if name == "cuda":
        if not _C.has_cuda():
            return False, "isofast._C was built without its CUDA kernels (ISOFAST_CUDA=0, no nvcc, or no GPU at build time)"
        if not torch.cuda.is_available():
            return False, "isofast._C has CUDA kernels but no CUDA GPU is available"
        return True, "compiled CUDA kernels (isofast._C)"
    return False, f"unknown compiled backend {name!r}"


def noise_dtype(data_dtype: torch.dtype) -> torch.dtype:
    """How the CPU kernels hold a draw for data of ``data_dtype``: float64 for float64, else float32
    (the generator's own values; 16-bit data reads them unrounded)."""
    return torch.float64 if data_dtype == torch.float64 else torch.float32


def draw(like: torch.Tensor, seed: int, offset: int) -> torch.Tensor:
    """The draw (seed, offset) for CPU data ``like`` (B, n), generated once by the CPU kernels."""
    # like only gives the shape and device: detached, so the draw is no autograd leaf of it
    return torch.ops.isofast_C.philox_randn(like.detach(), seed, offset).view(like.shape).to(noise_dtype(like.dtype))


if _C is not None:

    @torch.library.register_fake("isofast_C::philox_bits")
    def _(like, seed, offset):
        return like.new_empty(((like.numel() + 3) // 4, 4), dtype=torch.int32)

    @torch.library.register_fake("isofast_C::philox_randn")
    def _(like, seed, offset, scalar=False):
        return like.new_empty((like.numel(),), dtype=torch.float32)
