"""Triton backend of isofast: the primitives as torch ops ``torch.ops.isofast_triton.*``.

The ops have the schemas of the compiled ones (``torch.ops.isofast_C.*``, csrc/ops.cpp; a test holds
the two to each other), so `isofast.ops` calls either library the same way; their fake and autograd
functions are registered in `isofast.ops`, one module per op. One file per kernel family here:
`q_sample`, `iso_loss` (iso_sums, iso_grad), `steps` (ddpm_step, ddim_step); `philox` is the noise
contract in Triton, `settings` the launch settings and `launch` the launchers' shared prologue.

Data is contiguous (B, n) float32, bfloat16 or float16 (float64 raises TypeError: the ops layer
routes it to the reference); math runs in float32. Kernels run on CUDA tensors, or on CPU tensors
under ``TRITON_INTERPRET=1``. Without Triton (CPU-only torch builds) the ops are defined but have no kernels, and
`available` says why.
"""
from __future__ import annotations

import os

import torch

# The schemas of the primitives, as in csrc/ops.cpp.
SCHEMAS = {
    "q_sample": "(Tensor x0, Tensor t, Tensor sqrt_ab, Tensor sqrt_1mab, Tensor? e, int seed, int offset) -> Tensor",
    "iso_sums": "(Tensor p, Tensor? e, int seed, int offset, Tensor? x0=None, Tensor? coef=None) -> (Tensor, Tensor)",
    "iso_grad": "(Tensor p, Tensor? e, int seed, int offset, Tensor c1, Tensor c2, Tensor? x0=None, Tensor? coef=None) "
                "-> Tensor",
    "ddpm_step": "(Tensor x, Tensor eps_pred, Tensor t, Tensor table, Tensor? e, Tensor? key, bool clip_x0) -> Tensor",
    "ddim_step": "(Tensor x, Tensor eps_pred, Tensor t, Tensor t_prev, Tensor table, float eta, Tensor? e, "
                 "Tensor? key, bool clip_x0) -> Tensor",
}

_LIBRARY = torch.library.Library("isofast_triton", "DEF")
for _name, _schema in SCHEMAS.items():
    _LIBRARY.define(_name + _schema)

try:  # a torch without Triton (CPU-only builds) still imports isofast; `available` says why
    from isofast.kernels.iso_loss import iso_grad, iso_sums
    from isofast.kernels.q_sample import q_sample
    from isofast.kernels.steps import ddim_step, ddpm_step
except ImportError as exc:
    _IMPORT_ERROR = f"Triton kernels do not import: {type(exc).__name__}: {exc}"
else:
    _IMPORT_ERROR = ""
    for _launcher in (q_sample, iso_sums, iso_grad, ddpm_step, ddim_step):
        # CPU: the interpreter (TRITON_INTERPRET=1), how the tests run the kernels without a GPU.
        for _key in ("CUDA", "CPU"):
            _LIBRARY.impl(_launcher.__name__, _launcher, _key)


def available(name: str = "triton") -> tuple[bool, str]:
    """``(ok, reason)``: whether these kernels can run here as backend ``name``."""
    if name != "triton":
        return False, f"isofast.kernels implements the 'triton' backend, not {name!r}"
    if _IMPORT_ERROR:
        return False, _IMPORT_ERROR
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
