"""How the public arguments become the operands of a primitive: rows, coefficient tables, noise."""
from __future__ import annotations

import functools

import torch

from ..noise import NoiseKey, to_signed
from ..reference import compute_dtype
from ..schedule import NoiseSchedule
from . import extension


def rows(x: torch.Tensor) -> torch.Tensor:
    """x as a contiguous (B, n) tensor: row-major element order is what the noise contract indexes."""
    return x.reshape(x.shape[0], -1).contiguous()


def needs_reference_autograd(*tensors: torch.Tensor | None) -> bool:
    """True when autograd must flow into an input that a fused op treats as constant."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def noise(noise: torch.Tensor | NoiseKey, like: torch.Tensor, use_kept: bool) -> tuple[torch.Tensor | None, int, int]:
    """(e, seed, offset) of the primitives for ``noise`` beside data rows ``like`` (B, n).

    A tensor is passed as rows of the data dtype (seed and offset unused); a key as its seed and
    offset (int64 bit patterns), with e = the draw it carries (`NoiseKey.kept`) if ``use_kept``.
    """
    if isinstance(noise, torch.Tensor):
        return rows(noise.to(like.dtype)), 0, 0
    kept = noise.kept if use_kept else None
    if kept is not None:
        dtype = extension.noise_dtype(like.dtype)
        kept = kept if kept.shape == like.shape and kept.dtype == dtype else kept.view(like.shape).to(dtype)
    return kept, to_signed(noise.seed), to_signed(noise.offset)


@functools.lru_cache(maxsize=128)
def _cached_table(sched: NoiseSchedule, key: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    exact = sched.exact  # every row rounded once from float64, never rebuilt from a rounded one
    if key == "q_sample":
        parts = (exact("sqrt_alphas_cumprod"), exact("sqrt_one_minus_alphas_cumprod"))
    elif key in ("fixed_small", "fixed_large"):
        parts = (
            exact("sqrt_recip_alphas_cumprod"),
            exact("sqrt_recipm1_alphas_cumprod"),
            exact("posterior_mean_coef1"),
            exact("posterior_mean_coef2"),
            sched.posterior_std(key, exact=True),
        )
    elif key == "ddim":  # the rows of csrc/step_coefficients.h: ddim_coef
        parts = (
            exact("sqrt_recip_alphas_cumprod"),
            exact("sqrt_recipm1_alphas_cumprod"),
            exact("sqrt_alphas_cumprod"),
            exact("sqrt_one_minus_alphas_cumprod"),
            exact("alphas_cumprod"),
            1.0 - exact("alphas_cumprod"),
        )
    elif key == "snr":  # ab / (1 - ab), for min-SNR weights
        parts = (exact("alphas_cumprod") / (1.0 - exact("alphas_cumprod")),)
    elif key in PREDICTION_COEFFICIENTS:
        parts = PREDICTION_COEFFICIENTS[key](exact("sqrt_alphas_cumprod"), exact("sqrt_one_minus_alphas_cumprod"))
    else:
        raise KeyError(key)
    return torch.stack(parts).to(device=device, dtype=dtype).contiguous()


# The loss's rows for a prediction p of each type but eps (the primitives' coef): the target is
# tgt_eps eps + tgt_x0 x0 and the implied eps hat_p p + hat_eps eps + hat_x0 x0, from
# s = sqrt(ab_t) and sigma = sqrt(1 - ab_t) in float64 (x_t = s x0 + sigma eps):
#   v = s eps - sigma x0;   eps_hat = s v_hat + sigma x_t = s v_hat + sigma^2 eps + s sigma x0
#   x0;                     eps_hat = (x_t - s x0_hat) / sigma = -(s/sigma) x0_hat + eps + (s/sigma) x0
# s/sigma = sqrt(snr) grows without bound as t -> 0 (ARCHITECTURE.md, the loss).
PREDICTION_COEFFICIENTS = {
    "v_prediction": lambda s, sigma: (s, -sigma, s, sigma * sigma, s * sigma),
    "sample": lambda s, sigma: (torch.zeros_like(s), torch.ones_like(s), -s / sigma, torch.ones_like(s), s / sigma),
}


def prediction_coefficients(sched: NoiseSchedule, prediction_type: str, t: torch.Tensor,
                            like: torch.Tensor) -> torch.Tensor:
    """The primitives' coef (5, B) for timesteps ``t`` (int64 (B,) on like's device), in like's compute dtype."""
    return table(sched, prediction_type, like).index_select(1, t)


def table(sched: NoiseSchedule, key: str, like: torch.Tensor) -> torch.Tensor:
    """Stacked coefficient rows of ``sched`` on like's device in its compute dtype, cached per schedule.

    Cached so a training loop does not re-upload the (T,) tables every step. Schedules are
    immutable (frozen dataclass hashed by identity), so the cache cannot go stale.
    """
    return _cached_table(sched, key, like.device, compute_dtype(like.dtype))
