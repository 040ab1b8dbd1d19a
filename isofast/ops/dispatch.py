"""Choosing a backend for a call, and the small per-call plumbing every op shares."""
from __future__ import annotations

import functools
import os

import torch

from ..reference import compute_dtype
from ..schedule import NoiseSchedule
from . import backends

# Triton kernels compute in float32: float64 data goes to backends that compute in float64.
_FLOAT64_CAPABLE = ("reference", "cpu", "cuda")


def choose(backend: str | None, x: torch.Tensor) -> str:
    """The backend that runs an op on ``x`` (see `backends.resolve`), honouring dtype support."""
    return _choose(backend, x.device, x.dtype)


# torch.compile: the choice depends only on the arguments and the environment, so dynamo may call it
# once at trace time and bake the name into the graph instead of tracing imports and os.environ.
@torch.compiler.assume_constant_result
def _choose(backend: str | None, device: torch.device, dtype: torch.dtype) -> str:
    explicit = backend not in (None, "auto") or os.environ.get("ISOFAST_BACKEND", "auto") not in ("", "auto")
    name = backends.resolve(backend, device)
    if dtype == torch.float64 and name not in _FLOAT64_CAPABLE:
        if explicit:
            raise TypeError(f"backend {name!r} supports float32, bfloat16 and float16 data, got float64")
        name = "reference"
    return name


def run(op, backend: str, primitive: str, *args):
    """Call kernel ``primitive`` of ``backend`` with ``args``; ``op`` is its torch.library custom op.

    Eager calls go straight into the backend's kernel module: the custom-op layer costs 10-20 us
    of Python per call, as much as a CPU kernel at training sizes (B=64 x 3072 float32: iso_sums
    26 us, iso_grad 18 us). Under torch.compile the call goes through ``op``, opaque to dynamo, so it
    traces neither the kernel launchers nor the CPU noise cache of ``isofast.ops.compiled``.
    """
    if torch.compiler.is_compiling():
        return op(*args, backend)
    return getattr(backends.kernels(backend), primitive)(*args)


def needs_reference_autograd(*tensors: torch.Tensor | None) -> bool:
    """True when autograd must flow into an input that a fused op treats as constant."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def rows(x: torch.Tensor) -> torch.Tensor:
    """x as a contiguous (B, n) tensor: row-major element order is what the noise contract indexes."""
    return x.reshape(x.shape[0], -1).contiguous()


@functools.lru_cache(maxsize=128)
def _cached_table(sched: NoiseSchedule, key: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if key == "q_sample":
        parts = (sched.sqrt_alphas_cumprod, sched.sqrt_one_minus_alphas_cumprod)
    elif key in ("fixed_small", "fixed_large"):
        parts = (
            sched.sqrt_recip_alphas_cumprod,
            sched.sqrt_recipm1_alphas_cumprod,
            sched.posterior_mean_coef1,
            sched.posterior_mean_coef2,
            sched.posterior_std(key),
        )
    elif key == "alphas_cumprod":
        parts = (sched.alphas_cumprod,)
    else:
        raise KeyError(key)
    return torch.stack([p.to(torch.float64) for p in parts]).to(device=device, dtype=dtype).contiguous()


def table(sched: NoiseSchedule, key: str, like: torch.Tensor) -> torch.Tensor:
    """Stacked coefficient rows of ``sched`` on like's device in its compute dtype, cached per schedule.

    Cached so a training loop does not re-upload the (T,) tables every step. Schedules are
    immutable (frozen dataclass hashed by identity), so the cache cannot go stale.
    """
    return _cached_table(sched, key, like.device, compute_dtype(like.dtype))
