"""`q_sample`: the DDPM forward (noising) process, fused, with the noise generated in-kernel.

Fused path: one pass that reads x0 and writes x_t; on a GPU the noise exists only in registers and
is described by the returned `NoiseKey`, from which the loss regenerates it. On a CPU, where
generating costs several reads, the kernel also stores it once for the loss (`ops.compiled`).
"""
from __future__ import annotations

import torch

from .. import reference
from ..noise import NoiseKey, to_signed
from ..schedule import NoiseSchedule
from . import backends, dispatch, validation


@torch.library.custom_op("isofast::q_sample", mutates_args=())
def _q_sample_op(
    x0: torch.Tensor,
    t: torch.Tensor,
    sqrt_ab: torch.Tensor,
    sqrt_1mab: torch.Tensor,
    noise: torch.Tensor | None,
    seed: int,
    offset: int,
    backend: str,
) -> torch.Tensor:
    return backends.kernels(backend).q_sample(x0, t, sqrt_ab, sqrt_1mab, noise, seed, offset)


@_q_sample_op.register_fake
def _(x0, t, sqrt_ab, sqrt_1mab, noise, seed, offset, backend):
    return torch.empty_like(x0)


class _QSample(torch.autograd.Function):
    """x_t from the fused kernel; linear in x0 (and in an explicit noise tensor), so backward is a scaling."""

    @staticmethod
    def forward(ctx, x0, t, coefs, noise, seed, offset, backend):
        ctx.save_for_backward(t, coefs)
        return dispatch.run(_q_sample_op, backend, "q_sample", x0, t, coefs[0], coefs[1], noise, seed, offset)

    @staticmethod
    def backward(ctx, grad):
        t, coefs = ctx.saved_tensors

        def scaled(row):  # d x_t / d x0 (row 0) or d x_t / d eps (row 1), applied to grad
            return (coefs[row][t].unsqueeze(1) * grad.to(coefs.dtype)).to(grad.dtype)

        grad_x0 = scaled(0) if ctx.needs_input_grad[0] else None
        grad_noise = scaled(1) if ctx.needs_input_grad[3] else None
        return grad_x0, None, None, grad_noise, None, None, None


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
    used as given. Returns (x_t of x0's shape and dtype, the noise as given or the new key).
    Differentiable in x0 (and in a noise tensor).
    """
    validation.schedule(sched)
    x0 = validation.float_tensor("x0", x0)
    t = validation.timesteps("t", t, x0.shape[0], sched.T, x0.device)
    if noise is None:
        noise = NoiseKey.draw(x0.shape, x0.dtype, x0.device, generator)
    else:
        noise = validation.noise_for(noise, x0)
    name = dispatch.choose(backend, x0)
    if name == "reference" or (isinstance(noise, torch.Tensor) and dispatch.needs_reference_autograd(noise)):
        eps = noise.materialize(torch.float32) if isinstance(noise, NoiseKey) else noise
        return reference.q_sample(x0, t, sched, eps), noise
    if isinstance(noise, NoiseKey):
        eps, seed, offset = None, to_signed(noise.seed), to_signed(noise.offset)
    else:
        eps, seed, offset = dispatch.rows(noise.to(x0.dtype)), 0, 0
    x_t = _QSample.apply(dispatch.rows(x0), t, dispatch.table(sched, "q_sample", x0), eps, seed, offset, name)
    return x_t.reshape(x0.shape), noise
