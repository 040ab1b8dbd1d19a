"""Which implementation runs an op: the backends, whether they can run here, and the choice.

A fused backend is a library of torch ops, the *primitives*, with one schema each (csrc/ops.cpp;
the contract is in ARCHITECTURE.md at the repository root):

* "cpu" and "cuda": ``torch.ops.isofast_C``, the compiled extension (`isofast.ops.extension`);
  the dispatcher runs its CPU or CUDA kernel by the tensors' device.
* "triton": ``torch.ops.isofast_triton`` (`isofast.kernels`), the same schemas over Triton kernels.
* "reference": plain PyTorch (`isofast.reference`), the oracle; also the path for inputs that
  need autograd where a fused op treats them as constants.

The public ops call ``library(name).<primitive>(...)``: autograd and fake (shape) functions are
registered on the primitives themselves, so eager calls, autograd and ``torch.compile`` take the
same path.
"""
from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("reference", "triton", "cpu", "cuda")
FLOAT64_BACKENDS = ("reference", "cpu", "cuda")  # Triton kernels compute in float32
KEEPS_DRAW = ("cpu",)  # backends whose q_sample hands its materialised noise to the loss (NoiseKey.kept)


class BackendUnavailable(RuntimeError):
    """A backend named explicitly cannot run here (not built, no GPU, its import failed)."""


@functools.cache
def status(name: str) -> tuple[bool, str]:
    """(available, reason) of one backend, for `isofast info` and error messages."""
    if name == "reference":
        return True, "plain PyTorch, always available"
    try:  # a broken optional backend must not break `import isofast`
        if name == "triton":
            from .. import kernels

            return kernels.available()
        from . import extension

        return extension.available(name)
    except Exception as exc:
        return False, f"backend {name!r} failed to load: {type(exc).__name__}: {exc}"


# torch.compile: fixed for the life of the process, so dynamo may bake the answer into the graph
# instead of tracing the import machinery behind it.
@torch.compiler.assume_constant_result
def usable(name: str) -> bool:
    """Whether backend ``name`` is available here (`status` without the reason)."""
    return status(name)[0]


def resolve(backend: str | None, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """The backend an op runs on for data of ``dtype`` on ``device``.

    ``None``/"auto" honours ``ISOFAST_BACKEND``; otherwise Triton for CUDA tensors, the compiled
    CPU kernels for CPU tensors, the reference when neither is there, and the reference for float64
    data when the choice was automatic. A named backend that cannot run raises instead of falling back.
    """
    return _resolve(backend, torch.device(device), dtype)


# torch.compile: the choice depends only on the arguments and the environment, so dynamo may call it
# once at trace time and bake the name into the graph instead of tracing os.environ.
@torch.compiler.assume_constant_result
def _resolve(backend: str | None, device: torch.device, dtype: torch.dtype) -> str:
    if backend is None or backend == "auto":
        backend = os.environ.get("ISOFAST_BACKEND", "auto") or "auto"
    if backend == "auto":
        preferred = ("triton", "cuda") if device.type == "cuda" else ("cpu",)
        for name in preferred:
            if status(name)[0] and _supports_device(name, device):
                return name if dtype != torch.float64 or name in FLOAT64_BACKENDS else "reference"
        return "reference"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS} or None, got {backend!r}")
    ok, reason = status(backend)
    if not ok:
        raise BackendUnavailable(f"backend {backend!r} is not available: {reason}")
    if not _supports_device(backend, device):
        raise ValueError(f"backend {backend!r} cannot run on {device.type} tensors")
    if dtype == torch.float64 and backend not in FLOAT64_BACKENDS:
        raise TypeError(f"backend {backend!r} supports float32, bfloat16 and float16 data, got float64")
    return backend


def _supports_device(name: str, device: torch.device) -> bool:
    if name == "reference":
        return True
    if name == "cpu":
        return device.type == "cpu"
    if name == "cuda":
        return device.type == "cuda"
    # Triton: real GPUs, or CPU tensors when the interpreter is on (tests).
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def library(name: str):
    """The torch op namespace of fused backend ``name``: ``torch.ops.isofast_C`` or ``torch.ops.isofast_triton``."""
    return torch.ops.isofast_triton if name == "triton" else torch.ops.isofast_C


def fused(name: str) -> list[str]:
    """Fused backends that can run on device type ``name`` ("cpu" or "cuda"), for tests and reports."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        return []
    return [b for b in ("triton", "cpu", "cuda") if status(b)[0] and _supports_device(b, device)]


def register_fake(primitive: str):
    """Register one shape function for ``primitive`` on every library that defines it (decorator)."""

    def register(fn):
        for namespace in ("isofast_C", "isofast_triton"):
            if _defined(f"{namespace}::{primitive}"):
                torch.library.register_fake(f"{namespace}::{primitive}")(fn)
        return fn

    return register


def _defined(qualname: str) -> bool:
    namespace, name = qualname.split("::")
    return hasattr(getattr(torch.ops, namespace), name)
