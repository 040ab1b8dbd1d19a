"""The plain-PyTorch oracle of every isofast op.

Simple on purpose: every fused kernel is tested against these functions. They take
explicit noise tensors (keys are materialised by the caller), accept any float dtype
including float64, run on any device, are differentiable by autograd, and do their
arithmetic in float32 or wider (float64 for float64 inputs), with the schedule's
coefficients rounded once from its float64 masters (`NoiseSchedule.exact`).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .schedule import NoiseSchedule


class LossParts(NamedTuple):
    """Detached terms of the Iso-Diffusion loss, for logging.

    mse: the (weighted, reduced) noise-prediction MSE term; iso: the isotropy penalty before
    lambda (the batch term ((1/B) sum_b s_b - 1)^2, or the reduced (s_b - 1)^2 in mode "sample");
    isotropy: (1/B) sum_b s_b, the isotropy of eps_pred (1 for white noise).
    """

    mse: torch.Tensor
    iso: torch.Tensor
    isotropy: torch.Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types and float32, float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def _per_sample(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Gather table[t] and shape it (B, 1, ..., 1) to broadcast against ``like``."""
    coef = table.to(device=like.device, dtype=compute_dtype(like.dtype))[t]
    return coef.reshape(-1, *([1] * (like.ndim - 1)))


def q_sample(x0: torch.Tensor, t: torch.Tensor, sched: NoiseSchedule, noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps, per sample b with t[b]."""
    acc = compute_dtype(x0.dtype)
    x_t = _per_sample(sched.exact("sqrt_alphas_cumprod"), t, x0) * x0.to(acc)
    x_t = x_t + _per_sample(sched.exact("sqrt_one_minus_alphas_cumprod"), t, x0) * noise.to(acc)
    return x_t.to(x0.dtype)


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def per_sample_terms(
    pred: torch.Tensor,
    eps: torch.Tensor,
    prediction_type: str = "epsilon",
    x0: torch.Tensor | None = None,
    t: torch.Tensor | None = None,
    sched: NoiseSchedule | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mse_b, s_b), each (B,): mse_b = mean_i (pred - target)^2, s_b = mean_i eps_hat^2.

    epsilon: target eps, eps_hat = pred. With x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps (x0, t, sched needed):
    v_prediction: target v = sqrt(ab_t) eps - sqrt(1 - ab_t) x0, eps_hat = sqrt(ab_t) pred + sqrt(1 - ab_t) x_t;
    sample: target x0, eps_hat = (x_t - sqrt(ab_t) pred) / sqrt(1 - ab_t).
    """
    acc = compute_dtype(pred.dtype)
    p = pred.reshape(pred.shape[0], -1).to(acc)
    e = eps.reshape(eps.shape[0], -1).to(acc)
    if prediction_type == "epsilon":
        target, eps_hat = e, p
    else:
        x = x0.reshape(x0.shape[0], -1).to(acc)
        s = _per_sample(sched.exact("sqrt_alphas_cumprod"), t, p)
        sigma = _per_sample(sched.exact("sqrt_one_minus_alphas_cumprod"), t, p)
        x_t = s * x + sigma * e
        if prediction_type == "v_prediction":
            target, eps_hat = s * e - sigma * x, s * p + sigma * x_t
        else:
            target, eps_hat = x, (x_t - s * p) / sigma
    return ((p - target) ** 2).mean(dim=1), (eps_hat**2).mean(dim=1)


def snr(t: torch.Tensor, sched: NoiseSchedule) -> torch.Tensor:
    """The signal-to-noise ratio ab_t / (1 - ab_t) per sample, float64 from the schedule's masters."""
    ab = sched.exact("alphas_cumprod").to(t.device)[t]
    return ab / (1.0 - ab)


def min_snr_weights(ratio: torch.Tensor, snr_gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights of samples whose `snr` is ``ratio`` (Hang et al. 2023, as diffusers'
    training scripts weight each type), of ratio's dtype and shape.

    epsilon: min(snr, gamma) / snr; v_prediction: min(snr, gamma) / (snr + 1); sample: min(snr, gamma).
    """
    clipped = torch.clamp_max(ratio, snr_gamma)
    if prediction_type == "epsilon":
        return clipped / ratio
    if prediction_type == "v_prediction":
        return clipped / (ratio + 1.0)
    return clipped


def loss_from_terms(
    mse_b: torch.Tensor,
    s_b: torch.Tensor,
    iso_lambda: float | torch.Tensor,
    iso_mode: str,
    weights: torch.Tensor | None,
    reduction: str,
) -> tuple[torch.Tensor, LossParts]:
    """The Iso-Diffusion loss from the per-sample terms (ARCHITECTURE.md, "The Iso-Diffusion loss").

    batch:  sum_or_mean_b(w_b mse_b) + lambda * ((1/B) sum_b s_b - 1)^2
    sample: sum_or_mean_b(w_b (mse_b + lambda (s_b - 1)^2)); reduction "none" keeps the (B,) terms.
    The terms may have leading group dimensions, (G, B): each group is a loss of its own, reduced
    over its last dimension, with its own lambda (iso_lambda a float or a (G,) tensor).
    """
    w = torch.ones_like(mse_b) if weights is None else weights.to(mse_b.dtype)
    reduce = torch.mean if reduction == "mean" else torch.sum
    lam = iso_lambda if not isinstance(iso_lambda, torch.Tensor) else iso_lambda.to(mse_b.dtype)
    lam_b = lam.unsqueeze(-1) if isinstance(lam, torch.Tensor) else lam  # per sample, broadcast over B
    isotropy = s_b.mean(dim=-1)
    if iso_mode == "batch":
        mse = reduce(w * mse_b, dim=-1)
        iso = (isotropy - 1.0) ** 2
        loss = mse + lam * iso
        return loss, LossParts(mse.detach(), iso.detach(), isotropy.detach())
    pen_b = (s_b - 1.0) ** 2
    per_sample = w * (mse_b + lam_b * pen_b)
    if reduction == "none":
        return per_sample, LossParts((w * mse_b).detach(), pen_b.detach(), isotropy.detach())
    return reduce(per_sample, dim=-1), LossParts(reduce(w * mse_b, dim=-1).detach(), reduce(w * pen_b, dim=-1).detach(),
                                                 isotropy.detach())


def iso_ddpm_loss(
    eps_pred: torch.Tensor,
    eps: torch.Tensor,
    iso_lambda: float | torch.Tensor = 0.3,
    iso_mode: str = "batch",
    weights: torch.Tensor | None = None,
    reduction: str = "mean",
    groups: int = 1,
    *,
    prediction_type: str = "epsilon",
    x0: torch.Tensor | None = None,
    t: torch.Tensor | None = None,
    sched: NoiseSchedule | None = None,
    snr_gamma: float | None = None,
) -> tuple[torch.Tensor, LossParts]:
    """Reference Iso-Diffusion loss. Returns (loss, parts); the loss is float32 (float64 for float64 input).

    ``eps_pred`` is the model's output, a prediction of ``prediction_type`` (`per_sample_terms`: its
    target and implied eps; v_prediction and sample need ``x0``, ``t``, ``sched``). ``snr_gamma``: the
    weights are multiplied by `min_snr_weights` (needs ``t``, ``sched``).
    ``groups`` G > 1: the batch is G consecutive groups of B/G samples, each its own loss with its own
    lambda (a (G,) tensor or a float); the loss and parts are (G,) (reduction "none": (B,) terms).
    """
    mse_b, s_b = per_sample_terms(eps_pred, eps, prediction_type, x0, t, sched)
    if snr_gamma is not None:
        snr_w = min_snr_weights(snr(t, sched), snr_gamma, prediction_type).to(mse_b.dtype)
        weights = snr_w if weights is None else weights.to(mse_b.dtype) * snr_w
    if groups == 1:
        return loss_from_terms(mse_b, s_b, iso_lambda, iso_mode, weights, reduction)
    w = None if weights is None else weights.reshape(groups, -1)
    loss, parts = loss_from_terms(mse_b.reshape(groups, -1), s_b.reshape(groups, -1), iso_lambda, iso_mode, w,
                                  reduction)
    if reduction == "none":
        return loss.reshape(-1), LossParts(parts.mse.reshape(-1), parts.iso.reshape(-1), parts.isotropy)
    return loss, parts


def predict_x0(x_t: torch.Tensor, eps_pred: torch.Tensor, t: torch.Tensor, sched: NoiseSchedule, clip_x0: bool) -> torch.Tensor:
    """x0 = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t), optionally clipped to [-1, 1]; in the compute dtype."""
    acc = compute_dtype(x_t.dtype)
    x0 = _per_sample(sched.exact("sqrt_recip_alphas_cumprod"), t, x_t) * x_t.to(acc)
    x0 = x0 - _per_sample(sched.exact("sqrt_recipm1_alphas_cumprod"), t, x_t) * eps_pred.to(acc)
    return x0.clamp(-1.0, 1.0) if clip_x0 else x0


def ddpm_step(
    x_t: torch.Tensor,
    eps_pred: torch.Tensor,
    t: torch.Tensor,
    sched: NoiseSchedule,
    noise: torch.Tensor,
    clip_x0: bool = False,
    variance: str = "fixed_small",
) -> torch.Tensor:
    """Ancestral step x_t -> x_{t-1} = coef1 x0 + coef2 x_t + [t > 0] sigma_t z."""
    acc = compute_dtype(x_t.dtype)
    x0 = predict_x0(x_t, eps_pred, t, sched, clip_x0)
    coef1, coef2 = sched.exact("posterior_mean_coef1"), sched.exact("posterior_mean_coef2")
    mean = _per_sample(coef1, t, x_t) * x0 + _per_sample(coef2, t, x_t) * x_t.to(acc)
    sigma = _per_sample(sched.posterior_std(variance, exact=True), t, x_t)
    nonzero = (t > 0).reshape(sigma.shape).to(acc)
    return (mean + nonzero * sigma * noise.to(acc)).to(x_t.dtype)


def ddim_step(
    x_t: torch.Tensor,
    eps_pred: torch.Tensor,
    t: torch.Tensor,
    t_prev: torch.Tensor,
    sched: NoiseSchedule,
    eta: float,
    noise: torch.Tensor,
    clip_x0: bool = False,
) -> torch.Tensor:
    """DDIM step t -> t_prev: sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma z (Song et al., eq. 12)."""
    acc = compute_dtype(x_t.dtype)
    x0 = predict_x0(x_t, eps_pred, t, sched, clip_x0)
    s = sched.to(device=x_t.device, dtype=torch.float64)  # coefficients in float64, rounded once to acc
    c_x0, c_eps, sigma = (c.to(acc).reshape(-1, *([1] * (x_t.ndim - 1))) for c in s.ddim_coefficients(t, t_prev, eta))
    return (c_x0 * x0 + c_eps * eps_pred.to(acc) + sigma * noise.to(acc)).to(x_t.dtype)


def isotropy(x: torch.Tensor) -> torch.Tensor:
    """E[x^T x] / n over the batch: the mean over samples of (1/n) sum_i x[b, i]^2 (1 for white noise)."""
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating torch.Tensor (B, ...), got {getattr(x, 'dtype', type(x).__name__)}")
    if x.ndim < 1 or x.numel() == 0:
        raise ValueError(f"x must be a non-empty (B, ...) tensor, got shape {tuple(x.shape)}")
    return (x.reshape(x.shape[0], -1).to(compute_dtype(x.dtype)) ** 2).mean()


def forward_isotropy_theory(x0_sq_norm: torch.Tensor | float, n: int, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """E[x_t^T x_t] = n + (E[x0^T x0] - n) * ab_t for x_t = sqrt(ab) x0 + sqrt(1 - ab) eps, eps ~ N(0, I)."""
    return n + (torch.as_tensor(x0_sq_norm, dtype=alphas_cumprod.dtype) - n) * alphas_cumprod
