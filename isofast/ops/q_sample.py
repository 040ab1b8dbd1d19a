"""`q_sample`: the DDPM forward (noising) process, fused, with the noise generated in-kernel.

Primitive ``q_sample(x0, t, sqrt_ab, sqrt_1mab, e, seed, offset) -> x_t`` (and, on the CPU,
``q_sample_noise``, which also returns the draw): one pass that reads x0 and writes x_t. On a GPU
the noise exists only in registers and is described by the returned `NoiseKey`, from which the
loss regenerates it; on a CPU, where generating costs several reads, the key carries the draw
(`NoiseKey.kept`) to the loss. Autograd: x_t is linear in x0 (and in a noise tensor), so the
backward is a scaling by the gathered coefficients (csrc/autograd.cpp; `_backward` for Triton).
"""
from __future__ import annotations

import torch

from .. import reference
from ..noise import NoiseKey
from ..schedule import NoiseSchedule
from . import backends, operands, validation


def q_sample(
    x0: torch.Tensor,
    t: torch.Tensor | int,
    sched: NoiseSchedule,
    noise: torch.Tensor | NoiseKey | None = None,
    *,
    generator: torch.Generator | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | NoiseKey]:
    """Noise ``x0`` to timestep ``t``: x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps.

    x0: float tensor (B, ...); t: int64 (B,) (or an int) in [0, T). ``noise=None`` draws a fresh
    `NoiseKey` from torch's generator (``generator`` or the default one); a Tensor or NoiseKey is
    used as given. Returns (x_t of x0's shape and dtype, the noise as given or the new key; on the
    "cpu" backend the key carries its draw for the loss). Differentiable in x0 (and in a noise tensor).
    A returned key also carries ``t`` (int64 (B,) on x0's device), ``sched`` and ``x0`` itself (no
    copy): what `iso_ddpm_loss` needs for v- and x0-prediction and min-SNR weights.
    """
    validation.schedule(sched)
    x0 = validation.float_tensor("x0", x0)
    t = validation.timesteps("t", t, x0.shape[0], sched.T, x0.device)
    if noise is None:
        noise = NoiseKey.draw(x0.shape, x0.dtype, x0.device, generator)
    else:
        noise = validation.noise_for(noise, x0)
    name = backends.resolve(backend, x0.device, x0.dtype)
    if name == "reference" or (isinstance(noise, torch.Tensor) and operands.needs_reference_autograd(noise)):
        eps = noise.materialize(torch.float32) if isinstance(noise, NoiseKey) else noise
        return reference.q_sample(x0, t, sched, eps), _with_context(noise, t, sched, x0)
    x, coefs = operands.rows(x0), operands.table(sched, "q_sample", x0)
    e, seed, offset = operands.noise(noise, x, use_kept=False)
    # Keep the draw where regenerating it costs more than reading it back (not under torch.compile,
    # which traces the regenerating path: the same numbers).
    if e is None and name in backends.KEEPS_DRAW and not torch.compiler.is_compiling():
        x_t, kept = torch.ops.isofast_C.q_sample_noise(x, t, coefs[0], coefs[1], seed, offset)
        noise = noise.keeping(kept)
    else:
        x_t = backends.library(name).q_sample(x, t, coefs[0], coefs[1], e, seed, offset)
    return x_t.reshape(x0.shape), _with_context(noise, t, sched, x0)


def _with_context(noise: torch.Tensor | NoiseKey, t: torch.Tensor, sched: NoiseSchedule, x0: torch.Tensor):
    """A key with the context of this q_sample (a noise tensor is returned as given)."""
    return noise.with_context(t, sched, x0) if isinstance(noise, NoiseKey) else noise


@backends.register_fake("q_sample")
def _(x0, t, sqrt_ab, sqrt_1mab, e, seed, offset):
    return torch.empty_like(x0)


@backends.register_fake("q_sample_noise")
def _(x0, t, sqrt_ab, sqrt_1mab, seed, offset):
    return torch.empty_like(x0), torch.empty_like(x0, dtype=reference.compute_dtype(x0.dtype))


def _gather_scale(table: torch.Tensor, t: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """table[t] (B, 1) times grad, in the table's dtype, back in grad's dtype."""
    return (table[t].unsqueeze(1) * grad.to(table.dtype)).to(grad.dtype)


def _setup_context(ctx, inputs, output):
    x0, t, sqrt_ab, sqrt_1mab, e, seed, offset = inputs
    ctx.save_for_backward(t, sqrt_ab, sqrt_1mab)
    ctx.has_e = e is not None


def _backward(ctx, grad):
    t, sqrt_ab, sqrt_1mab = ctx.saved_tensors
    grad_x0 = _gather_scale(sqrt_ab, t, grad) if ctx.needs_input_grad[0] else None
    grad_e = _gather_scale(sqrt_1mab, t, grad) if ctx.has_e and ctx.needs_input_grad[4] else None
    return grad_x0, None, None, None, grad_e, None, None


torch.library.register_autograd("isofast_triton::q_sample", _backward, setup_context=_setup_context)
