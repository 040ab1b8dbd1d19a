"""Exponential moving average (EMA) of a model's weights, the weights diffusion models sample with."""
from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["EMA"]


class EMA:
    """A frozen copy of ``model`` whose floating-point parameters track ``model``'s by an EMA.

    After optimizer step ``k`` (k = 0, 1, ...): ``ema <- ema + (1 - d_k) (param - ema)`` with
    ``d_k = decay`` or, with ``warmup``, ``d_k = min(decay, (1 + k) / (10 + k))`` so that early
    averages are not dominated by the random initialisation. Buffers (and non-float parameters)
    are copied, not averaged. The copy is in eval mode and never requires grad.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be a float in (0, 1), got {decay!r}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step: int) -> float:
        """The decay used by the update after optimizer step ``step`` (0-based)."""
        return min(self.decay, (1.0 + step) / (10.0 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Move the average towards ``model`` (the unwrapped module the EMA was made from)."""
        weight = 1.0 - self.decay_at(step)
        ema_float, src_float = [], []
        for (name, e), p in zip(self.module.named_parameters(), model.parameters(), strict=True):
            if e.shape != p.shape:
                raise ValueError(f"EMA parameter {name} has shape {tuple(e.shape)} but the model's has {tuple(p.shape)}")
            if e.is_floating_point():
                ema_float.append(e)
                src_float.append(p.detach())
            else:
                e.copy_(p)
        if ema_float:
            # lerp: e + w (p - e), one fused multi-tensor kernel for every parameter.
            torch._foreach_lerp_(ema_float, src_float, weight)
        for e, b in zip(self.module.buffers(), model.buffers(), strict=True):
            e.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
