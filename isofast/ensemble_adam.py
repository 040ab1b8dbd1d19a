"""The ensemble's Adam on a CPU: torch's numbers in one pass over the parameters.

`torch.optim.Adam` on a CPU runs about ten elementwise passes per parameter tensor, and the ensemble's
EMA and per-member gradient clipping two more: for M stacked 2-D models that was half of a training
step, and at the paper's batch of 64 the step is bound by the optimizer's memory traffic.
`EnsembleAdam.fused_step` does the same arithmetic in one compiled pass (csrc/cpu/adam.cpp): per chunk
of a few thousand elements, the moments (with each member's clipping coefficient applied on the fly),
torch's own sqrt, the parameters and the EMA, while the chunk is in cache. Every element is computed as
torch computes it, in the same order and rounding, so a member stays bitwise the single run that
`torch.optim.Adam` trains (tests/test_ensemble_adam.py). One exception, for speed: the kernel flushes
subnormal moments to zero (a dead unit's first moment decays into that range, where x86 arithmetic is
~100x slower; torch keeps them), which leaves the weights bitwise torch's (see csrc/cpu/adam.cpp). The
optimizer's state is torch's: its checkpoints load either way.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .ops import extension  # loads isofast._C: torch.ops.isofast_C.adam_step_

__all__ = ["EnsembleAdam"]


class EnsembleAdam(torch.optim.Adam):
    """`torch.optim.Adam` (one parameter group, no weight decay, amsgrad or maximize) with `fused_step`.

    ``step()`` is torch's; `fused_step` needs the compiled CPU kernels (`isofast.ops.extension`) and
    float32 contiguous CPU parameters.
    """

    def __init__(self, params, lr: float, betas: tuple[float, float], eps: float) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, foreach=False)

    @staticmethod
    def fused_available() -> bool:
        """Whether `fused_step` can run here (the compiled CPU kernels are built)."""
        return extension.available("cpu")[0]

    @torch.no_grad()
    def fused_step(self, scale: torch.Tensor | None = None, ema: Sequence[torch.Tensor] = (),
                   ema_weight: float = 0.0) -> None:
        """One Adam step, as ``g.mul_(scale[member]); step(); torch._foreach_lerp_(ema, params, ema_weight)``
        computes it, without modifying the gradients.

        scale: (M,) float32, each member's gradient coefficient (clipping), the first dimension of every
        parameter being the member; None: 1. ema: one tensor per parameter (the EMA copy), or empty.
        """
        group = self.param_groups[0]
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        ema = list(ema)
        if ema and [tuple(e.shape) for e in ema] != [tuple(p.shape) for p in params]:
            raise ValueError(f"ema must be empty or hold one tensor per parameter of its shape: got "
                             f"{len(ema)} tensors for {len(params)} parameters")
        grads, exp_avgs, exp_avg_sqs = [], [], []
        for p in params:
            state = self.state[p]
            if not state:  # as torch.optim.Adam initialises it
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
        beta1, beta2 = group["betas"]
        step = float(self.state[params[0]]["step"]) + 1  # one step count: every member steps together
        # the kernel checks every tensor before it writes: a refused step leaves the state as it was
        torch.ops.isofast_C.adam_step_(params, grads, exp_avgs, exp_avg_sqs, ema, scale, beta1, beta2,
                                       group["lr"] / (1 - beta1 ** step), (1 - beta2 ** step) ** 0.5, group["eps"],
                                       ema_weight)
        for p in params:
            self.state[p]["step"] += 1
