"""What a user writes instead of isofast: plain PyTorch, as in the common DDPM code bases.

These are the baselines of every row, timed eagerly and under ``torch.compile``. They take the
schedule as plain (T,) tensors, draw noise with ``torch.randn_like`` (``noise=...`` substitutes a
given tensor, used only by the correctness checks), and compute the loss with ``F.mse_loss`` plus
the isotropy term. Half-precision inputs are upcast to float32 for the loss, as a careful user
does (and as isofast does): a bf16 mean over 10^5+ elements would be visibly wrong.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def _col(coef: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return coef[t].reshape(-1, *([1] * (like.ndim - 1)))


def q_sample(x0, t, sqrt_ab, sqrt_1mab, noise=None):
    """x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps; returns (x_t, eps)."""
    if noise is None:
        noise = torch.randn_like(x0)
    x_t = _col(sqrt_ab, t, x0) * x0 + _col(sqrt_1mab, t, x0) * noise
    return x_t.to(x0.dtype), noise


def iso_loss(eps_pred, noise, iso_lambda: float, iso_mode: str = "batch"):
    """MSE + iso_lambda * isotropy penalty ("batch": the paper's (mean s_b - 1)^2; "sample": mean (s_b - 1)^2)."""
    p, e = eps_pred.float(), noise.float()
    if iso_mode == "batch":
        return F.mse_loss(p, e) + iso_lambda * (p.pow(2).mean() - 1.0) ** 2
    mse_b = F.mse_loss(p, e, reduction="none").flatten(1).mean(1)
    s_b = p.pow(2).flatten(1).mean(1)
    return (mse_b + iso_lambda * (s_b - 1.0) ** 2).mean()


def loss_fwd_bwd(eps_pred, noise, iso_lambda, iso_mode):
    """(loss, d loss / d eps_pred)."""
    loss = iso_loss(eps_pred, noise, iso_lambda, iso_mode)
    (grad,) = torch.autograd.grad(loss, eps_pred)
    return loss, grad


def noise_loss_fwd_bwd(x0, t, eps_pred, sqrt_ab, sqrt_1mab, iso_lambda, noise=None):
    """Noising + loss forward + backward; eps_pred stands in for the model output. Returns (x_t, loss, grad)."""
    x_t, noise = q_sample(x0, t, sqrt_ab, sqrt_1mab, noise)
    loss = iso_loss(eps_pred, noise, iso_lambda, "batch")
    (grad,) = torch.autograd.grad(loss, eps_pred)
    return x_t, loss, grad


def ddpm_step(x, eps_pred, t, c_x0, c_eps, coef1, coef2, sigma, noise=None):
    """Ancestral DDPM step: x0 = c_x0 x - c_eps eps; x_prev = coef1 x0 + coef2 x + [t > 0] sigma z."""
    if noise is None:
        noise = torch.randn_like(x)
    xf = x.float()
    x0 = _col(c_x0, t, x) * xf - _col(c_eps, t, x) * eps_pred.float()
    mean = _col(coef1, t, x) * x0 + _col(coef2, t, x) * xf
    nonzero = (t > 0).to(mean.dtype).reshape(_col(sigma, t, x).shape)
    return (mean + nonzero * _col(sigma, t, x) * noise.float()).to(x.dtype)


def step_tables(sched, device, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """The (T,) tensors the user-written step reads (from an isofast NoiseSchedule)."""
    s = sched.to(device=device, dtype=dtype)
    return {
        "c_x0": s.sqrt_recip_alphas_cumprod,
        "c_eps": s.sqrt_recipm1_alphas_cumprod,
        "coef1": s.posterior_mean_coef1,
        "coef2": s.posterior_mean_coef2,
        "sigma": s.posterior_std("fixed_small"),
    }


def ddpm_loop(model, x_T, tables, noise_fn: Callable[[int, torch.Tensor], torch.Tensor] | None = None):
    """T-step ancestral sampling loop from x_T; ``noise_fn(i, x)`` gives step i's noise (default randn_like)."""
    T = tables["c_x0"].numel()
    x = x_T
    batch = x.shape[0]
    with torch.no_grad():
        for i, step in enumerate(range(T - 1, -1, -1)):
            t = torch.full((batch,), step, dtype=torch.int64, device=x.device)
            eps = model(x, t)
            noise = None if noise_fn is None else noise_fn(i, x)
            x = ddpm_step(x, eps, t, **tables, noise=noise)
    return x


def ddim_loop(model, x_T, alphas_cumprod, steps: int):
    """Deterministic DDIM (eta = 0) over ``steps`` jumps t = (steps-1) r, ..., r, 0 (r = T // steps) to x_0.

    x0 = (x - sqrt(1 - ab_t) eps) / sqrt(ab_t); x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev) eps,
    ab_prev = 1 after the last jump.
    """
    T = alphas_cumprod.numel()
    r = T // steps
    x = x_T
    batch = x.shape[0]
    with torch.no_grad():
        for step in range((steps - 1) * r, -1, -r):
            t = torch.full((batch,), step, dtype=torch.int64, device=x.device)
            eps = model(x, t)
            ab = alphas_cumprod[step]
            ab_prev = alphas_cumprod[step - r] if step - r >= 0 else torch.ones_like(ab)
            x0 = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
            x = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps
    return x


def diffusers_missing(class_name: str) -> str:
    """Why diffusers' ``class_name`` cannot be compared here, and how to get it (the text of a skipped variant)."""
    try:
        import diffusers
    except Exception as exc:
        return (f"diffusers not importable ({type(exc).__name__}); to compare: pip install diffusers "
                "(or pip install '.[bench]')")
    return f"diffusers {diffusers.__version__} has no {class_name}; to compare: pip install -U diffusers"


def _diffusers_linear(class_name: str, sched_T: int, beta_start: float, beta_end: float, **config):
    """diffusers' scheduler ``class_name`` on our linear schedule (epsilon prediction, no clipping), with
    the extra ``config``; None when diffusers (or that class) does not import."""
    try:
        import diffusers

        scheduler_class = getattr(diffusers, class_name)
    except Exception:
        return None
    return scheduler_class(num_train_timesteps=sched_T, beta_schedule="linear", beta_start=beta_start,
                           beta_end=beta_end, clip_sample=False, prediction_type="epsilon", **config)


def diffusers_ddim_scheduler(sched_T: int, beta_start: float, beta_end: float):
    """diffusers' DDIMScheduler with isofast's DDIM conventions ("leading" spacing, ab_prev = 1 at the end)."""
    return _diffusers_linear("DDIMScheduler", sched_T, beta_start, beta_end,
                             set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")


def diffusers_ddim_loop(model, x_T, scheduler, steps: int):
    """The diffusers DDIM loop (eta = 0)."""
    scheduler.set_timesteps(steps)
    x = x_T
    batch = x.shape[0]
    with torch.no_grad():
        for step in scheduler.timesteps:
            eps = model(x, torch.full((batch,), int(step), dtype=torch.int64, device=x.device))
            x = scheduler.step(eps, int(step), x, eta=0.0).prev_sample
    return x


def diffusers_scheduler(sched_T: int, beta_start: float, beta_end: float):
    """diffusers' DDPMScheduler configured as our linear schedule, or None when diffusers is missing."""
    return _diffusers_linear("DDPMScheduler", sched_T, beta_start, beta_end, variance_type="fixed_small")


def diffusers_loop(model, x_T, scheduler, generator=None):
    """The diffusers sampling loop a user would write: scheduler.step per timestep."""
    scheduler.set_timesteps(scheduler.config.num_train_timesteps)
    x = x_T
    batch = x.shape[0]
    with torch.no_grad():
        for step in scheduler.timesteps:
            eps = model(x, torch.full((batch,), int(step), dtype=torch.int64, device=x.device))
            x = scheduler.step(eps, int(step), x, generator=generator).prev_sample
    return x


class PlainTrainStep:
    """One plain eager training step: noising, model, reference loss in fp32, backward, Adam, EMA."""

    def __init__(self, model, sched, iso_lambda: float, lr: float = 2e-4, ema_decay: float = 0.999):
        import copy

        self.model = model
        self.ema = copy.deepcopy(model).requires_grad_(False)
        device = next(model.parameters()).device
        s = sched.to(device=device)
        self.sqrt_ab, self.sqrt_1mab, self.T = s.sqrt_alphas_cumprod, s.sqrt_one_minus_alphas_cumprod, s.T
        self.iso_lambda, self.ema_decay = iso_lambda, ema_decay
        self.opt = torch.optim.Adam(model.parameters(), lr=lr)

    def __call__(self, x0: torch.Tensor, t: torch.Tensor | None = None, noise: torch.Tensor | None = None):
        """One step on x0; ``t``/``noise`` substitute the random draws (correctness checks only)."""
        if t is None:
            t = torch.randint(0, self.T, (x0.shape[0],), device=x0.device)
        x_t, noise = q_sample(x0, t, self.sqrt_ab, self.sqrt_1mab, noise)
        loss = iso_loss(self.model(x_t, t), noise, self.iso_lambda, "batch")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            for p_ema, p in zip(self.ema.parameters(), self.model.parameters(), strict=True):
                p_ema.mul_(self.ema_decay).add_(p, alpha=1 - self.ema_decay)
        return loss.detach()


class DiffusersLoopStep:
    """One step of diffusers' unconditional training loop (examples/unconditional_image_generation): t ~
    U{0..T-1}, ``torch.randn`` + ``scheduler.add_noise``, ``unet(x_t, t).sample``, ``F.mse_loss`` + the isotropy
    term (`iso_loss`, "batch": the Iso-Diffusion objective), backward, AdamW."""

    def __init__(self, unet, scheduler, iso_lambda: float, lr: float = 1e-4):
        self.unet, self.scheduler, self.iso_lambda = unet, scheduler, iso_lambda
        self.T = scheduler.config.num_train_timesteps
        self.opt = torch.optim.AdamW(unet.parameters(), lr=lr)

    def __call__(self, x0: torch.Tensor, t: torch.Tensor | None = None, noise: torch.Tensor | None = None):
        """One step on x0; ``t``/``noise`` substitute the random draws (correctness checks only)."""
        if t is None:
            t = torch.randint(0, self.T, (x0.shape[0],), device=x0.device)
        if noise is None:
            noise = torch.randn(x0.shape, device=x0.device)
        loss = iso_loss(self.unet(self.scheduler.add_noise(x0, noise, t), t).sample, noise, self.iso_lambda)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach()
