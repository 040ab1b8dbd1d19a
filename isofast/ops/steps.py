"""`ddpm_step` and `ddim_step`: one reverse-diffusion update in one fused pass.

Fresh noise comes from the contract with a key read from device memory (an int64 (2,)
tensor), so a CUDA-graph-captured sampling loop replays with new noise when the key tensor is
overwritten between replays. The `*_keyed` functions are that graph-safe entry point: no
argument checks that read device values, no host-side randomness.
"""
from __future__ import annotations

import torch

from .. import reference
from ..noise import NoiseKey
from ..schedule import NoiseSchedule
from . import backends, dispatch, validation


@torch.library.custom_op("isofast::ddpm_step", mutates_args=())
def _ddpm_step_op(
    x: torch.Tensor,
    eps_pred: torch.Tensor,
    t: torch.Tensor,
    table: torch.Tensor,
    noise: torch.Tensor | None,
    key: torch.Tensor | None,
    clip_x0: bool,
    backend: str,
) -> torch.Tensor:
    return backends.kernels(backend).ddpm_step(x, eps_pred, t, table, noise, key, clip_x0)


@_ddpm_step_op.register_fake
def _(x, eps_pred, t, table, noise, key, clip_x0, backend):
    return torch.empty_like(x)


@torch.library.custom_op("isofast::ddim_step", mutates_args=())
def _ddim_step_op(
    x: torch.Tensor,
    eps_pred: torch.Tensor,
    t: torch.Tensor,
    t_prev: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    eta: float,
    noise: torch.Tensor | None,
    key: torch.Tensor | None,
    clip_x0: bool,
    backend: str,
) -> torch.Tensor:
    return backends.kernels(backend).ddim_step(x, eps_pred, t, t_prev, alphas_cumprod, eta, noise, key, clip_x0)


@_ddim_step_op.register_fake
def _(x, eps_pred, t, t_prev, alphas_cumprod, eta, noise, key, clip_x0, backend):
    return torch.empty_like(x)


def _check_step_inputs(x_t, eps_pred, sched):
    validation.schedule(sched)
    x_t = validation.float_tensor("x_t", x_t)
    eps_pred = validation.float_tensor("eps_pred", eps_pred)
    validation.same_shape("eps_pred", eps_pred, "x_t", x_t)
    validation.same_device("eps_pred", eps_pred.device, "x_t", x_t.device)
    return x_t, eps_pred


def _resolve_noise(noise, x_t, generator):
    if noise is None:
        return NoiseKey.draw(x_t.shape, x_t.dtype, x_t.device, generator)
    return validation.noise_for(noise, x_t)


def _fused_noise_args(noise, x_t):
    """(explicit noise rows or None, device key tensor or None) for the kernels."""
    if isinstance(noise, NoiseKey):
        return None, noise.as_tensor(x_t.device)
    return dispatch.rows(noise.to(x_t.dtype)), None


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
    noise = _resolve_noise(noise, x_t, generator)
    name = dispatch.choose(backend, x_t)
    noise_tensor = noise if isinstance(noise, torch.Tensor) else None
    if name == "reference" or dispatch.needs_reference_autograd(x_t, eps_pred, noise_tensor):
        z = noise.materialize(torch.float32) if isinstance(noise, NoiseKey) else noise
        return reference.ddpm_step(x_t, eps_pred, t, sched, z, clip_x0, variance)
    e, key = _fused_noise_args(noise, x_t)
    return ddpm_step_keyed(x_t, eps_pred, t, sched, e, key, clip_x0, variance, name)


def ddpm_step_keyed(x_t, eps_pred, t, sched, noise, key, clip_x0, variance, backend) -> torch.Tensor:
    """Graph-safe fused DDPM step: t int64 (B,) and key int64 (2,) already on the device, no checks."""
    table = dispatch.table(sched, variance, x_t)
    out = dispatch.run(
        _ddpm_step_op, backend, "ddpm_step", dispatch.rows(x_t), dispatch.rows(eps_pred), t, table, noise, key, clip_x0
    )
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
    """DDIM step x_t -> x_{t_prev} (Song et al., 2021); t_prev = -1 jumps to x_0 (ab_prev = 1).

    x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps_pred + sigma z, with
    sigma = eta sqrt((1 - ab_prev)/(1 - ab_t) (1 - ab_t/ab_prev)); eta = 0 is deterministic.
    """
    x_t, eps_pred = _check_step_inputs(x_t, eps_pred, sched)
    t = validation.timesteps("t", t, x_t.shape[0], sched.T, x_t.device)
    t_prev = validation.timesteps("t_prev", t_prev, x_t.shape[0], sched.T, x_t.device)
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not eta >= 0 or eta != eta or eta == float("inf"):
        raise ValueError(f"eta must be a finite float >= 0, got {eta!r}")
    noise = _resolve_noise(noise, x_t, generator)
    name = dispatch.choose(backend, x_t)
    noise_tensor = noise if isinstance(noise, torch.Tensor) else None
    if name == "reference" or dispatch.needs_reference_autograd(x_t, eps_pred, noise_tensor):
        z = noise.materialize(torch.float32) if isinstance(noise, NoiseKey) else noise
        return reference.ddim_step(x_t, eps_pred, t, t_prev, sched, float(eta), z, clip_x0)
    e, key = _fused_noise_args(noise, x_t)
    return ddim_step_keyed(x_t, eps_pred, t, t_prev, sched, float(eta), e, key, clip_x0, name)


def ddim_step_keyed(x_t, eps_pred, t, t_prev, sched, eta, noise, key, clip_x0, backend) -> torch.Tensor:
    """Graph-safe fused DDIM step: t, t_prev int64 (B,) and key int64 (2,) already on the device."""
    ab = dispatch.table(sched, "alphas_cumprod", x_t)[0]
    args = (dispatch.rows(x_t), dispatch.rows(eps_pred), t, t_prev, ab, eta, noise, key, clip_x0)
    out = dispatch.run(_ddim_step_op, backend, "ddim_step", *args)
    return out.reshape(x_t.shape)
