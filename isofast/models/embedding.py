"""Sinusoidal timestep embedding shared by the 2D MLP and the image UNet."""

from __future__ import annotations

import math

import torch

__all__ = ["timestep_embedding"]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Embed timesteps as sinusoids of geometrically spaced frequencies (DDPM / guided-diffusion).

    With ``half = dim // 2`` and ``f_j = max_period ** (-j / half)`` for ``j = 0 .. half-1``::

        emb[b] = [cos(t_b f_0), ..., cos(t_b f_{half-1}), sin(t_b f_0), ..., sin(t_b f_{half-1})]

    followed by one zero column when ``dim`` is odd.

    Args:
        t: (B,) timesteps, int64 or float (fractional timesteps are allowed); any device.
        dim: embedding width, >= 2.
        max_period: the longest period; the lowest frequency is ``1 / max_period``.

    Returns:
        (B, dim) float32 tensor on ``t``'s device (float64 if ``t`` is float64).
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1:
        raise ValueError(f"t must have shape (B,), got {tuple(t.shape)}")
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"t must be an integer or float tensor, got {t.dtype}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2:
        raise ValueError(f"dim must be an int >= 2, got {dim!r}")
    if not max_period > 0:
        raise ValueError(f"max_period must be > 0, got {max_period!r}")

    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    half = dim // 2
    # Frequencies exp(-ln(max_period) * j / half), j = 0..half-1: f_0 = 1, spacing geometric.
    exponent = torch.arange(half, device=t.device, dtype=dtype) * (-math.log(max_period) / half)
    args = t.to(dtype)[:, None] * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = torch.cat([emb, emb.new_zeros(emb.shape[0], 1)], dim=1)
    return emb
