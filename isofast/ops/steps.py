"""`ddpm_step` and `ddim_step`: one reverse-diffusion update in one fused pass.

Fresh noise comes from the contract with a key read from device memory (an int64 (2,)
tensor), so a CUDA-graph-captured sampling loop replays with new noise when the key tensor is
overwritten between replays. The `*_keyed` functions are that graph-safe entry point (no
argument checks that read device values, no host-side randomness); the samplers call them on
every backend, the reference included (which reads the key on the host: never captured).
The fused steps have no autograd: differentiable inputs go to the reference.
"""
from __future__ import annotations

import torch

from .. import reference
from ..noise import NoiseKey, to_unsigned
from ..schedule import NoiseSchedule
from . import backends, operands, validation


def _check_step_inputs(x_t, eps_pred, sched):
    validation.schedule(sched)
    x_t = validation.float_tensor("x_t", x_t)
    eps_pred = validation.float_tensor("eps_pred", eps_pred)
    validation.same_shape("eps_pred", eps_pred, "x_t", x_t)
    validation.same_dtype("eps_pred", eps_pred, "x_t", x_t)
    validation.same_device("eps_pred", eps_pred.device, "x_t", x_t.device)
    return x_t, eps_pred


def _step_operands(noise, x_t, eps_pred, generator, backend):
    """(explicit noise or None, device key tensor or None, backend) of a step from its public arguments.

    The reference backend, and inputs that need autograd (the fused steps treat them as constants),
    take the reference step with the noise materialised; fused backends get rows or the key tensor.
    """
    if noise is None:
        noise = NoiseKey.draw(x_t.shape, x_t.dtype, x_t.device, generator)
    else:
        noise = validation.noise_for(noise, x_t)
    name = backends.resolve(backend, x_t.device, x_t.dtype)
    noise_tensor = noise if isinstance(noise, torch.Tensor) else None
    if name == "reference" or operands.needs_reference_autograd(x_t, eps_pred, noise_tensor):
        return (noise.materialize(torch.float32) if isinstance(noise, NoiseKey) else noise), None, "reference"
    if isinstance(noise, NoiseKey):
        return None, noise.as_tensor(x_t.device), name
    return operands.rows(noise.to(x_t.dtype)), None, name


def ddpm_step(
    x_t: torch.Tensor,
    eps_pred: torch.Tensor,
    t: torch.Tensor | int,
    sched: NoiseSchedule,
    noise: torch.Tensor | NoiseKey | None = None,
    *,
    clip_x0: bool = False,
    variance: str = "fixed_small",
    generator: torch.Generator | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """DDPM ancestral step x_t -> x_{t-1} (Ho et al., 2020).

    x0 = (x_t - sqrt(1 - ab_t) eps_pred) / sqrt(ab_t), clipped to [-1, 1] if ``clip_x0``;
    x_{t-1} = coef1_t x0 + coef2_t x_t + [t > 0] sigma_t z, with sigma_t^2 the posterior
    variance ("fixed_small") or beta_t ("fixed_large"). z: ``noise`` (a tensor or NoiseKey) or a
    fresh key from ``generator``. x_t, eps_pred: (B, ...) of one float dtype; t: int or int64 (B,).
    """
    x_t, eps_pred = _check_step_inputs(x_t, eps_pred, sched)
    t = validation.timesteps("t", t, x_t.shape[0], sched.T, x_t.device)
    variance = validation.choice("variance", variance, ("fixed_small", "fixed_large"))
    clip_x0 = validation.flag("clip_x0", clip_x0)
    e, key, name = _step_operands(noise, x_t, eps_pred, generator, backend)
    return ddpm_step_keyed(x_t, eps_pred, t, sched, e, key, clip_x0, variance, name)


def ddpm_step_keyed(x_t, eps_pred, t, sched, noise, key, clip_x0, variance, backend) -> torch.Tensor:
    """Graph-safe DDPM step: t int64 (B,) and key int64 (2,) (or explicit noise) on the device, no checks."""
    if backend == "reference":
        return reference.ddpm_step(x_t, eps_pred, t, sched, _reference_noise(noise, key, x_t), clip_x0, variance)
    table = operands.table(sched, variance, x_t)
    rows = operands.rows
    out = backends.library(backend).ddpm_step(rows(x_t), rows(eps_pred), t, table, noise, key, clip_x0)
    return out.reshape(x_t.shape)


def ddim_step(
    x_t: torch.Tensor,
    eps_pred: torch.Tensor,
    t: torch.Tensor | int,
    t_prev: torch.Tensor | int,
    sched: NoiseSchedule,
    eta: float = 0.0,
    noise: torch.Tensor | NoiseKey | None = None,
    *,
    clip_x0: bool = False,
    generator: torch.Generator | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """DDIM step x_t -> x_{t_prev} (Song et al., 2021); t_prev < t, and t_prev = -1 jumps to x_0 (ab_prev = 1).

    x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps_pred + sigma z, with
    sigma = eta sqrt((1 - ab_prev)/(1 - ab_t) (1 - ab_t/ab_prev)); eta = 0 is deterministic.
    """
    x_t, eps_pred = _check_step_inputs(x_t, eps_pred, sched)
    t = validation.timesteps("t", t, x_t.shape[0], sched.T, x_t.device)
    t_prev = validation.timesteps("t_prev", t_prev, x_t.shape[0], sched.T, x_t.device)
    validation.steps_back(t, t_prev)
    eta = validation.finite_nonnegative("eta", eta)
    clip_x0 = validation.flag("clip_x0", clip_x0)
    e, key, name = _step_operands(noise, x_t, eps_pred, generator, backend)
    return ddim_step_keyed(x_t, eps_pred, t, t_prev, sched, eta, e, key, clip_x0, name)


def ddim_step_keyed(x_t, eps_pred, t, t_prev, sched, eta, noise, key, clip_x0, backend) -> torch.Tensor:
    """Graph-safe DDIM step: t, t_prev int64 (B,) and key int64 (2,) (or explicit noise) on the device."""
    if backend == "reference":
        z = _reference_noise(noise, key, x_t)
        return reference.ddim_step(x_t, eps_pred, t, t_prev, sched, eta, z, clip_x0)
    table = operands.table(sched, "ddim", x_t)
    rows = operands.rows
    out = backends.library(backend).ddim_step(rows(x_t), rows(eps_pred), t, t_prev, table, eta, noise, key, clip_x0)
    return out.reshape(x_t.shape)


def _reference_noise(noise: torch.Tensor | None, key: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """The explicit noise, else the draw of the device key (read on the host)."""
    if noise is not None:
        return noise
    seed, offset = (to_unsigned(v) for v in key.tolist())
    return NoiseKey(seed, offset, like.shape, device=like.device).materialize(torch.float32)


@backends.register_fake("ddpm_step")
def _(x, eps_pred, t, table, e, key, clip_x0):
    return torch.empty_like(x)


@backends.register_fake("ddim_step")
def _(x, eps_pred, t, t_prev, table, eta, e, key, clip_x0):
    return torch.empty_like(x)
