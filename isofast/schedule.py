"""`NoiseSchedule`: the DDPM variance schedule and every table derived from it.

Tables are computed in float64 from the betas and cast once to the schedule's
dtype, so a float32 schedule carries correctly rounded values rather than values
accumulated in float32 (``alphas_cumprod`` is a product of up to T factors).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

from . import scalars
from .schedule_names import SCHEDULES  # the named schedules of `NoiseSchedule.from_name`

_TABLES = (
    "betas",
    "alphas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """Per-timestep tables of a DDPM forward process q(x_t | x_0) = N(sqrt(ab_t) x_0, (1 - ab_t) I).

    Each field is a (T,) tensor indexed by timestep t in [0, T):
    ``betas`` b_t; ``alphas`` a_t = 1 - b_t; ``alphas_cumprod`` ab_t = prod_{s<=t} a_s;
    ``alphas_cumprod_prev`` ab_{t-1} (1 at t = 0); their square roots and reciprocals;
    ``posterior_variance`` b_t (1 - ab_{t-1}) / (1 - ab_t) (the "fixed_small" variance);
    ``posterior_log_variance_clipped`` its log with the t = 0 entry replaced by t = 1's (it is 0 there);
    ``posterior_mean_coef1/2``: mean of q(x_{t-1} | x_t, x_0) = coef1 x_0 + coef2 x_t.
    DDIM coefficients are derived from ``alphas_cumprod`` per step pair (see ``ddim_coefficients``).
    """

    name: str
    betas: torch.Tensor
    alphas: torch.Tensor
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    sqrt_recip_alphas_cumprod: torch.Tensor
    sqrt_recipm1_alphas_cumprod: torch.Tensor
    posterior_variance: torch.Tensor
    posterior_log_variance_clipped: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor
    # float64 master copies (CPU) of every table: casts in `.to(dtype=...)` start from these, so a
    # float64 schedule made from a float32 one holds exact values, not float32-rounded ones.
    masters: dict = field(default=None, repr=False, compare=False)

    # ----- constructors -------------------------------------------------------------------------
    @classmethod
    def from_betas(cls, betas: torch.Tensor, name: str = "custom", dtype: torch.dtype = torch.float32) -> NoiseSchedule:
        """Derive every table from ``betas`` (T,), each in (0, 1); ``dtype`` a real floating dtype."""
        _check_dtype(dtype)
        if isinstance(betas, torch.Tensor) and (betas.dtype.is_complex or betas.dtype == torch.bool):
            raise TypeError(f"betas must be real numbers, got a {betas.dtype} tensor")
        try:
            b = torch.as_tensor(betas, dtype=torch.float64).detach().cpu()
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"betas must be a 1-D tensor or sequence of real numbers, got {type(betas).__name__}") from exc
        if b.ndim != 1 or b.numel() < 1:
            raise ValueError(f"betas must be a non-empty 1-D tensor, got shape {tuple(b.shape)}")
        if not torch.isfinite(b).all() or (b <= 0).any() or (b >= 1).any():
            # beta = 1 makes alphas_cumprod 0 from there on: infinite tables, NaN steps
            raise ValueError(f"betas must be finite and in (0, 1), got values in [{b.min().item()}, {b.max().item()}]")
        a = 1.0 - b
        ab = torch.cumprod(a, 0)
        ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
        post_var = b * (1.0 - ab_prev) / (1.0 - ab)
        # log(0) at t = 0: use t = 1's value as Ho et al. do (only matters for fixed_small log-likelihoods).
        post_log_var = torch.log(torch.cat([post_var[1:2], post_var[1:]])) if b.numel() > 1 else torch.log(b)
        tables = {
            "betas": b,
            "alphas": a,
            "alphas_cumprod": ab,
            "alphas_cumprod_prev": ab_prev,
            "sqrt_alphas_cumprod": ab.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - ab).sqrt(),
            "sqrt_recip_alphas_cumprod": (1.0 / ab).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / ab - 1.0).sqrt(),
            "posterior_variance": post_var,
            "posterior_log_variance_clipped": post_log_var,
            "posterior_mean_coef1": b * ab_prev.sqrt() / (1.0 - ab),
            "posterior_mean_coef2": (1.0 - ab_prev) * a.sqrt() / (1.0 - ab),
        }
        cast = {k: v.to(dtype) for k, v in tables.items()}
        for key in tables:  # alphas_cumprod underflowing (long schedules, large betas) or 1 - beta rounding to 1
            if not (torch.isfinite(tables[key]).all() and torch.isfinite(cast[key]).all()):
                raise ValueError(f"betas give non-finite {key} in {dtype} (alphas_cumprod ends at "
                                 f"{ab[-1].item():.3g}, smallest beta {b.min().item():.3g}); use betas further from 0 "
                                 "and 1 or fewer steps")
        return cls(name=name, masters=tables, **cast)

    @classmethod
    def linear(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, dtype: torch.dtype = torch.float32) -> NoiseSchedule:
        """Ho et al. (2020): betas linear from ``beta_start`` to ``beta_end``."""
        T = _check_T(T)
        beta_start, beta_end = _check_beta("beta_start", beta_start), _check_beta("beta_end", beta_end)
        return cls.from_betas(torch.linspace(beta_start, beta_end, T, dtype=torch.float64), "linear", dtype)

    @classmethod
    def scaled_linear(
        cls, T: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012, dtype: torch.dtype = torch.float32
    ) -> NoiseSchedule:
        """Latent-diffusion schedule: sqrt(beta) linear between the square roots of the ends."""
        T = _check_T(T)
        beta_start, beta_end = _check_beta("beta_start", beta_start), _check_beta("beta_end", beta_end)
        roots = torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), T, dtype=torch.float64)
        return cls.from_betas(roots**2, "scaled_linear", dtype)

    @classmethod
    def cosine(cls, T: int = 1000, s: float = 0.008, max_beta: float = 0.999, dtype: torch.dtype = torch.float32) -> NoiseSchedule:
        """Nichol & Dhariwal (2021): ab(t) = cos^2(((t/T + s)/(1 + s)) pi/2), betas clipped at ``max_beta``."""
        T = _check_T(T)
        s, max_beta = scalars.real("s", s), _check_beta("max_beta", max_beta)
        if not 0 <= s < math.inf:
            raise ValueError(f"s must be finite and >= 0, got {s}")
        steps = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        betas = torch.clamp(1.0 - f[1:] / f[:-1], max=max_beta)
        return cls.from_betas(betas, "cosine", dtype)

    @classmethod
    def from_name(cls, name: str, T: int) -> NoiseSchedule:
        """The schedule ``name`` (one of `SCHEDULES`: "linear", "cosine", "scaled_linear") with T steps and
        its default parameters, in float32."""
        if name not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {name!r}")
        return getattr(cls, name)(T=T)

    @classmethod
    def from_diffusers(cls, scheduler: object, dtype: torch.dtype = torch.float32) -> NoiseSchedule:
        """The schedule of a diffusers DDPMScheduler/DDIMScheduler or of its config (a mapping; diffusers need
        not be installed for a mapping): ``beta_schedule`` "linear", "scaled_linear" (with ``beta_start``,
        ``beta_end``), "squaredcos_cap_v2" (isofast's cosine) or ``trained_betas``, over
        ``num_train_timesteps``; computed in float64 like every isofast schedule. Other ``beta_schedule``
        names raise ValueError. See `isofast.diffusers_bridge.schedule`."""
        from .diffusers_bridge.schedule import schedule_from_diffusers

        return schedule_from_diffusers(scheduler, dtype)

    # ----- properties and conversions -------------------------------------------------------------
    @property
    def T(self) -> int:
        return self.betas.numel()

    @property
    def device(self) -> torch.device:
        return self.betas.device

    @property
    def dtype(self) -> torch.dtype:
        return self.betas.dtype

    def exact(self, name: str) -> torch.Tensor:
        """Table ``name`` in float64 from the masters: exact values, not ones rounded to the schedule's dtype.

        The coefficient tables of the kernels and the reference's are rounded once from these. (A plain
        lookup, not a cached schedule: torch.compile traces it.)
        """
        return self.masters[name] if self.masters else getattr(self, name).to(torch.float64)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> NoiseSchedule:
        """A copy with every table moved and/or cast; casts start from the float64 masters."""
        dtype = dtype or self.dtype
        _check_dtype(dtype)
        masters = self.masters or {name: getattr(self, name).to(torch.float64) for name in _TABLES}
        moved = {name: masters[name].to(device=device or self.device, dtype=dtype) for name in _TABLES}
        return NoiseSchedule(name=self.name, masters=masters, **moved)

    def to_diffusers(self, kind: str = "ddpm", **overrides):
        """A diffusers DDPMScheduler (``kind="ddpm"``) or DDIMScheduler (``"ddim"``) with these betas (a named
        ``beta_schedule`` when they are one, else ``trained_betas``), ``clip_sample=False`` and
        ``prediction_type="epsilon"``; ``overrides``: further config fields, none that changes the betas or T
        (ValueError). Needs diffusers."""
        from .diffusers_bridge.schedule import scheduler_from_schedule

        return scheduler_from_schedule(self, kind, **overrides)

    def posterior_std(self, variance: str = "fixed_small", exact: bool = False) -> torch.Tensor:
        """Std of the noise a DDPM ancestral step adds: sqrt(posterior_variance) or sqrt(beta_t) ("fixed_large");
        ``exact``: in float64 from the masters (`exact`)."""
        table = self.exact if exact else functools.partial(getattr, self)
        if variance == "fixed_small":
            return table("posterior_variance").sqrt()
        if variance == "fixed_large":
            return table("betas").sqrt()
        raise ValueError(f"variance must be 'fixed_small' or 'fixed_large', got {variance!r}")

    def ddim_coefficients(self, t: torch.Tensor, t_prev: torch.Tensor, eta: float = 0.0) -> tuple[torch.Tensor, ...]:
        """For a DDIM jump t -> t_prev (t_prev = -1 means ab_prev = 1): (sqrt(ab_prev), sqrt(1 - ab_prev - sigma^2), sigma).

        sigma = eta * sqrt((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)) (Song et al. 2021, eq. 16).
        """
        ab = self.alphas_cumprod[t]
        ab_prev = torch.where(t_prev >= 0, self.alphas_cumprod[t_prev.clamp_min(0)], torch.ones_like(ab))
        sigma = eta * torch.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
        return ab_prev.sqrt(), torch.clamp_min(1 - ab_prev - sigma**2, 0).sqrt(), sigma

    def __repr__(self) -> str:
        return f"NoiseSchedule({self.name}, T={self.T}, dtype={self.dtype}, device={self.device})"


def _check_T(T: int) -> int:
    if not scalars.is_integer(T) or T < 1:
        raise ValueError(f"T must be a positive int, got {T!r}")
    return int(T)


def _check_beta(name: str, value: object) -> float:
    value = scalars.real(name, value)
    if not 0 < value < 1:
        raise ValueError(f"{name} must be in (0, 1), got {value}")
    return value


def _check_dtype(dtype: object) -> None:
    """Tables are real floating point: an integer dtype would round every beta to 0, a complex one is meaningless."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a real floating torch.dtype (float32, float64, ...), got {dtype!r}")
