"""The 2-D noise predictor of the Iso-Diffusion authors' 2024 code, for the ``authors2024`` protocol.

Layers ``2 -> 128 -> 128 -> 128 -> 2``. Every layer l, the output layer included, adds its own learned
time embedding to its linear output before the activation (ReLU after every layer but the last)::

    e     = sinusoidal(t + 1)                       float time; t is the 0-based step index
    h_l   = act(W_l h_{l-1} + b_l + C_l relu(A_l e + a_l) + c_l)

with ``sinusoidal(s)[2i] = sin(s w_i)``, ``sinusoidal(s)[2i+1] = cos(s w_i)``, ``w_i = 10000^(-2i/emb_dim)``
(sin on even slots, cos on odd slots, emb_dim = 50). This is the authors' ``ConditionalDenseModel`` with a
``LearnableSinusoidalEncoding([50, out_l, out_l])`` per layer; isofast's own `TimeMLP` differs (one
bias-free projection per hidden layer of a cos|sin embedding of t, no time term on the output layer).
"""
from __future__ import annotations

import torch
from torch import nn

from .mlp import points_and_timesteps

__all__ = ["AuthorsMLP", "sinusoidal_encoding"]


def sinusoidal_encoding(s: torch.Tensor, dim: int) -> torch.Tensor:
    """(B, dim) float32 encoding of float times ``s`` (B,): sin(s w_i) on even slots, cos(s w_i) on odd."""
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2 or dim % 2:
        raise ValueError(f"dim must be an even int >= 2, got {dim!r}")
    i = torch.arange(dim // 2, device=s.device, dtype=torch.float32)
    omega = 1.0 / (10000.0 ** (2.0 * i / dim))
    angle = s.to(torch.float32)[:, None] * omega[None, :]
    # interleaved, as the authors' emb[:, 0::2] = sin, emb[:, 1::2] = cos
    return torch.stack([torch.sin(angle), torch.cos(angle)], dim=-1).flatten(-2)


class AuthorsMLP(nn.Module):
    """eps_theta(x_t, t) of the authors' 2024 2-D experiments (see the module docstring).

    Args:
        data_dim: d, the width of x and of the output.
        hidden: width of every hidden layer.
        n_layers: number of hidden layers (>= 1); the model has n_layers + 1 linear layers.
        emb_dim: width of the sinusoidal encoding (even, >= 2).
    """

    def __init__(self, data_dim: int = 2, hidden: int = 128, n_layers: int = 3, emb_dim: int = 50) -> None:
        super().__init__()
        for name, value, low in (("data_dim", data_dim, 1), ("hidden", hidden, 1), ("n_layers", n_layers, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if isinstance(emb_dim, bool) or not isinstance(emb_dim, int) or emb_dim < 2 or emb_dim % 2:
            raise ValueError(f"emb_dim must be an even int >= 2, got {emb_dim!r}")
        self.data_dim, self.hidden, self.n_layers, self.emb_dim = data_dim, hidden, n_layers, emb_dim
        widths = [data_dim] + [hidden] * n_layers + [data_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True))
        self.time_in = nn.ModuleList(nn.Linear(emb_dim, b) for b in widths[1:])
        self.time_out = nn.ModuleList(nn.Linear(b, b) for b in widths[1:])

    def forward(self, x: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """(B, data_dim) predicted noise for x_t (B, data_dim) and 0-based timesteps t (B,) (or one number)."""
        t = points_and_timesteps(x, t, self.data_dim)
        e = sinusoidal_encoding(t.to(x.device, torch.float32) + 1.0, self.emb_dim).to(x.dtype)
        h = x
        last = len(self.layers) - 1
        for i, (layer, t_in, t_out) in enumerate(zip(self.layers, self.time_in, self.time_out, strict=True)):
            h = layer(h) + t_out(torch.relu(t_in(e)))
            if i < last:
                h = torch.relu(h)
        return h
