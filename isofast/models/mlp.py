"""Time-conditioned MLP noise predictor for the 2D experiments of Iso-Diffusion."""

from __future__ import annotations

import torch
from torch import nn

from isofast.models.embedding import timestep_embedding

__all__ = ["TimeMLP", "points_and_timesteps"]


def points_and_timesteps(x: torch.Tensor, t: torch.Tensor | int | float, data_dim: int) -> torch.Tensor:
    """Check a 2-D model's inputs, x (B, data_dim) and t (B,) or one number; returns t as a (B,) tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2 or x.shape[1] != data_dim:
        raise ValueError(f"x must have shape (B, {data_dim}), got {tuple(x.shape)}")
    if not isinstance(t, torch.Tensor):
        t = torch.tensor(t, device=x.device)
    if t.dim() == 0:
        t = t.expand(x.shape[0])
    if t.dim() != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"t must have shape ({x.shape[0]},) to match x, got {tuple(t.shape)}")
    return t


class TimeMLP(nn.Module):
    """eps_theta(x_t, t) for low-dimensional data: ReLU MLP with the timestep injected at every hidden layer.

    Default shape is the one of the paper's 2D experiments, ``2 -> 128 -> 128 -> 128 -> 2``.
    With ``e = timestep_embedding(t, emb_dim)`` (computed once per call)::

        h_0 = x
        h_l = relu(W_l h_{l-1} + b_l + P_l e)      for l = 1 .. n_layers   (width ``hidden``)
        out = W_out h_{n_layers} + b_out                                     (width ``data_dim``)

    ``P_l`` is a bias-free per-layer linear projection of the sinusoidal embedding, so each layer sees
    ``t`` through its own learned map (the layer bias already plays the role of a projection bias).

    Args:
        data_dim: d, the width of x and of the output.
        hidden: width of every hidden layer.
        n_layers: number of hidden layers (>= 1).
        emb_dim: width of the sinusoidal timestep embedding (>= 2).
        max_period: passed to :func:`timestep_embedding`.
    """

    def __init__(
        self,
        data_dim: int = 2,
        hidden: int = 128,
        n_layers: int = 3,
        emb_dim: int = 128,
        max_period: float = 10000.0,
    ) -> None:
        super().__init__()
        for name, value, low in (("data_dim", data_dim, 1), ("hidden", hidden, 1), ("n_layers", n_layers, 1),
                                 ("emb_dim", emb_dim, 2)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        self.data_dim = data_dim
        self.hidden = hidden
        self.n_layers = n_layers
        self.emb_dim = emb_dim
        self.max_period = max_period
        widths = [data_dim] + [hidden] * n_layers
        self.layers = nn.ModuleList(nn.Linear(widths[i], widths[i + 1]) for i in range(n_layers))
        self.time_proj = nn.ModuleList(nn.Linear(emb_dim, hidden, bias=False) for _ in range(n_layers))
        self.out = nn.Linear(hidden, data_dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor | int | float) -> torch.Tensor:
        """Predict the noise.

        Args:
            x: (B, data_dim) float tensor, the noisy sample x_t.
            t: (B,) int64 or float timesteps (a 0-d tensor or a Python number is broadcast to all B).

        Returns:
            (B, data_dim) tensor of x's dtype.
        """
        t = points_and_timesteps(x, t, self.data_dim)
        emb = timestep_embedding(t.to(x.device), self.emb_dim, self.max_period).to(x.dtype)
        h = x
        for layer, proj in zip(self.layers, self.time_proj, strict=True):
            h = torch.relu(layer(h) + proj(emb))
        return self.out(h)
