"""Isotropy of the forward diffusion process: measured E[x_t^T x_t]/n per timestep against theory.

For x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps with eps ~ N(0, I_n) independent of x_0,
E[x_0^T eps] = 0 and E[eps^T eps] = n, so::

    E[x_t^T x_t] = n + (E[x_0^T x_0] - n) ab_t,   i.e. per element   E[x_t^T x_t]/n = 1 + (iso_0 - 1) ab_t

with iso_0 = E[x_0^T x_0]/n. Everything here is in per-element units (divided by n), like
``isofast.isotropy``: pure Gaussian noise has isotropy 1.

The schedule is any object with an ``alphas_cumprod`` (T,) tensor (``isofast.NoiseSchedule`` or a
stand-in); this module does not import the rest of isofast.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["forward_isotropy_curve", "plot_isotropy_curve"]


def _alphas_cumprod(sched: object) -> np.ndarray:
    ab = getattr(sched, "alphas_cumprod", None)
    if ab is None:
        raise TypeError(f"sched must have an alphas_cumprod tensor, got {type(sched).__name__}")
    ab = torch.as_tensor(ab).detach().to("cpu", torch.float64)
    if ab.dim() != 1 or ab.numel() == 0:
        raise ValueError(f"sched.alphas_cumprod must have shape (T,), got {tuple(ab.shape)}")
    if not ((ab > 0) & (ab <= 1)).all():
        raise ValueError("sched.alphas_cumprod must lie in (0, 1]")
    return ab.numpy()


def _timesteps(timesteps: Sequence[int] | torch.Tensor | np.ndarray | None, T: int) -> np.ndarray:
    if timesteps is None:
        return np.arange(T, dtype=np.int64)
    ts = np.asarray(timesteps.cpu() if isinstance(timesteps, torch.Tensor) else timesteps)
    if ts.dtype == np.bool_ or not np.issubdtype(ts.dtype, np.integer):
        raise TypeError(f"timesteps must be integers, got dtype {ts.dtype}")
    if ts.ndim != 1 or ts.size == 0:
        raise ValueError(f"timesteps must be a non-empty 1-D sequence, got shape {ts.shape}")
    if ts.min() < 0 or ts.max() >= T:
        raise ValueError(f"timesteps must lie in [0, {T}), got range [{ts.min()}, {ts.max()}]")
    return ts.astype(np.int64)


def forward_isotropy_curve(
    x0: torch.Tensor,
    sched: object,
    timesteps: Sequence[int] | torch.Tensor | np.ndarray | None = None,
    generator: torch.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Measure the isotropy of q(x_t | x_0) on data ``x0`` and return it beside its theoretical value.

    For each timestep t: draw eps ~ N(0, I) (``torch.randn`` with ``generator``, float64), form
    x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps and record mean_b (1/n) x_t[b]^T x_t[b]. The theory is
    1 + (iso_0 - 1) ab_t with iso_0 = mean_b (1/n) x0[b]^T x0[b] from the same data, so the two
    curves differ only by the Monte-Carlo error of the noise (standard error ~ sqrt(2/(n B)) at
    large t for B samples).

    Args:
        x0: (B, ...) data, any float dtype and device; each sample is flattened to n elements.
        sched: object with ``alphas_cumprod``, a (T,) tensor of ab_t in (0, 1].
        timesteps: integer timesteps in [0, T) to measure; ``None`` for all of 0 .. T-1.
        generator: torch generator on x0's device for the noise (``None``: the global one).

    Returns:
        ``(measured, theory)``, two float64 numpy arrays of shape (len(timesteps),).
    """
    if not isinstance(x0, torch.Tensor):
        raise TypeError(f"x0 must be a torch.Tensor, got {type(x0).__name__}")
    if x0.dim() < 2 or x0.shape[0] == 0 or x0[0].numel() == 0:
        raise ValueError(f"x0 must have shape (B, ...) with B >= 1 and n >= 1 elements each, got {tuple(x0.shape)}")
    if x0.is_complex() or not x0.is_floating_point():
        raise TypeError(f"x0 must be a float tensor, got {x0.dtype}")
    ab = _alphas_cumprod(sched)
    ts = _timesteps(timesteps, ab.shape[0])

    x = x0.detach().reshape(x0.shape[0], -1).to(torch.float64)
    if not torch.isfinite(x).all():
        raise ValueError("x0 contains NaN or inf")
    n = x.shape[1]
    iso0 = (x * x).sum(1).mean() / n
    measured = torch.empty(ts.shape[0], dtype=torch.float64, device=x.device)
    with torch.no_grad():
        for i, t in enumerate(ts.tolist()):
            eps = torch.randn(x.shape, generator=generator, dtype=torch.float64, device=x.device)
            x_t = math.sqrt(ab[t]) * x + math.sqrt(1.0 - ab[t]) * eps
            measured[i] = (x_t * x_t).sum(1).mean() / n
    theory = 1.0 + (iso0.item() - 1.0) * ab[ts]
    return measured.cpu().numpy(), theory


def plot_isotropy_curve(
    measured: Sequence[float] | np.ndarray,
    theory: Sequence[float] | np.ndarray,
    timesteps: Sequence[int] | np.ndarray,
    path: str | os.PathLike,
    title: str = "Isotropy of the forward process",
) -> str:
    """Plot measured and theoretical isotropy against the timestep and write a PNG to ``path``.

    Uses matplotlib's Agg canvas directly (no pyplot, no global backend change).

    Args:
        measured, theory, timesteps: 1-D sequences of one length (as from :func:`forward_isotropy_curve`).
        path: output file; its folder must exist.
        title: figure title.

    Returns:
        ``path`` as a string.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    measured, theory, timesteps = (np.asarray(a, dtype=np.float64) for a in (measured, theory, timesteps))
    for name, a in (("measured", measured), ("theory", theory), ("timesteps", timesteps)):
        if a.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    if not (measured.shape == theory.shape == timesteps.shape):
        raise ValueError(
            f"measured, theory and timesteps must have one length, got {measured.shape[0]}, "
            f"{theory.shape[0]}, {timesteps.shape[0]}")
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(timesteps, measured, label="measured", linewidth=1.5)
    ax.plot(timesteps, theory, label=r"theory $1 + (\mathrm{iso}_0 - 1)\,\bar\alpha_t$", linestyle="--",
            linewidth=1.5)
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("timestep t")
    ax.set_ylabel(r"$E[x_t^\top x_t]\,/\,n$")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path = os.fspath(path)
    fig.savefig(path, format="png")
    return path
