"""Backend registry: which fused implementations exist and which one an op uses.

Every fused backend is a module exposing the same five *kernel primitives*. They
receive already-validated inputs; all argument checking happens once, in
``isofast.ops``, so every backend raises the same errors.

Shapes: ``B`` samples of ``n`` elements; ``x``, ``p``, ``e`` are contiguous
``(B, n)`` tensors of one float dtype (float32, bfloat16, float16; float64 where
the backend supports it). ``t``/``t_prev`` are contiguous int64 ``(B,)`` on the
data device. Coefficient tables are contiguous 1-D or 2-D tensors on the data
device, float64 when the data is float64 and float32 otherwise. All arithmetic
runs in float32 (float64 for float64 data); outputs have the data dtype unless
stated.

Noise: ``e is None`` means "generate it by the noise contract" of
ARCHITECTURE.md: element ``i = b*n + j`` of the draw keyed by ``(seed, offset)``.
``seed``/``offset`` are passed as the *int64 bit patterns* of the unsigned
64-bit values (see ``isofast.noise.to_signed``): kernels reinterpret them as
uint64. For sampler steps the key lives in an int64 device tensor ``key`` of
shape (2,) = (seed, offset) so a CUDA graph can replay with a new key.

The primitives::

    q_sample(x0, t, sqrt_ab, sqrt_1mab, e, seed, offset) -> x_t
        x_t[b] = sqrt_ab[t[b]] * x0[b] + sqrt_1mab[t[b]] * eps[b]

    iso_sums(p, e, seed, offset) -> (sse, ssq)          # float32 (B,) (float64 for float64 data)
        sse[b] = sum_j (p[b,j] - eps[b,j])**2 ;  ssq[b] = sum_j p[b,j]**2

    iso_grad(p, e, seed, offset, c1, c2) -> g           # c1, c2: float32/64 (B,) on the device
        g[b,j] = c1[b] * (p[b,j] - eps[b,j]) + c2[b] * p[b,j]

    ddpm_step(x, eps_pred, t, table, e, key, clip_x0) -> x_prev
        table: (5, T), rows = sqrt_recip_ab, sqrt_recipm1_ab, posterior_mean_coef1,
        posterior_mean_coef2, sigma (the std of the added noise for the chosen variance)
        x0 = table[0,t]*x - table[1,t]*eps_pred ; if clip_x0: x0 = clamp(x0, -1, 1)
        x_prev = table[2,t]*x0 + table[3,t]*x + (t > 0) * table[4,t] * z
        z = e if e is not None else the draw keyed by key[0], key[1] (element b*n+j)

    ddim_step(x, eps_pred, t, t_prev, alphas_cumprod, eta, e, key, clip_x0) -> x_prev
        ab = alphas_cumprod[t]; ab_prev = alphas_cumprod[t_prev] if t_prev >= 0 else 1
        x0 = (x - sqrt(1-ab) eps_pred) / sqrt(ab) ; clip as above
        sigma = eta * sqrt((1-ab_prev)/(1-ab) * (1 - ab/ab_prev))
        x_prev = sqrt(ab_prev) x0 + sqrt(max(1 - ab_prev - sigma^2, 0)) eps_pred + sigma z

and ``available() -> tuple[bool, str]`` (the reason when not available).

Backends: ``"triton"`` (``isofast.kernels``), ``"cpu"``/``"cuda"`` (the
compiled extension, ``isofast.ops.compiled``), and ``"reference"`` (plain
PyTorch, ``isofast.reference``; also the autograd fallback).
"""
from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch

BACKENDS = ("reference", "triton", "cpu", "cuda")
_MODULES = {"triton": "isofast.kernels", "cpu": "isofast.ops.compiled", "cuda": "isofast.ops.compiled"}


@functools.cache
def _load(name: str) -> tuple[ModuleType | None, str]:
    """Import a backend module once; return (module or None, reason)."""
    if name == "reference":
        return None, "always available"
    try:
        module = importlib.import_module(_MODULES[name])
        ok, reason = module.available(name)
    except Exception as exc:  # a broken optional backend must not break `import isofast`
        return None, f"{_MODULES[name]} failed to load: {type(exc).__name__}: {exc}"
    return (module if ok else None), reason


def status(name: str) -> tuple[bool, str]:
    """(available, reason) of one backend, for `isofast info` and error messages."""
    if name == "reference":
        return True, "plain PyTorch, always available"
    module, reason = _load(name)
    return module is not None, reason


# torch.compile: fixed for the life of the process, so dynamo may bake the answer into the graph
# instead of tracing the import machinery behind it.
@torch.compiler.assume_constant_result
def usable(name: str) -> bool:
    """Whether backend ``name`` loaded and is available (`status` without the reason)."""
    return status(name)[0]


def resolve(backend: str | None, device: torch.device) -> str:
    """The backend an op runs on for tensors on ``device``.

    ``None``/"auto" honours ``ISOFAST_BACKEND``; otherwise Triton for CUDA tensors,
    the compiled CPU kernels for CPU tensors, the reference when neither is there.
    An explicitly named backend that cannot run raises instead of falling back.
    """
    if backend is None or backend == "auto":
        backend = os.environ.get("ISOFAST_BACKEND", "auto") or "auto"
    if backend == "auto":
        preferred = ("triton", "cuda") if device.type == "cuda" else ("cpu",)
        for name in preferred:
            if status(name)[0] and _supports_device(name, device):
                return name
        return "reference"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS} or None, got {backend!r}")
    ok, reason = status(backend)
    if not ok:
        raise RuntimeError(f"backend {backend!r} is not available: {reason}")
    if not _supports_device(backend, device):
        raise ValueError(f"backend {backend!r} cannot run on {device.type} tensors")
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


def kernels(name: str) -> ModuleType:
    """The module implementing the kernel primitives of backend ``name``."""
    module, reason = _load(name)
    if module is None:
        raise RuntimeError(f"backend {name!r} is not available: {reason}")
    return module
