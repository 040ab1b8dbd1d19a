"""The ensemble's Adam on a CPU: torch's numbers in two passes over the parameters.

`torch.optim.Adam` on a CPU runs about ten elementwise passes per parameter tensor, and the ensemble's
EMA and per-member gradient clipping two more: for M stacked 2-D models that was half of a training
step. `EnsembleAdam.fused_step` does the same arithmetic in the compiled kernels of csrc/cpu/adam.cpp:
one pass for the moments (with each member's clipping coefficient applied on the fly), torch's own sqrt,
one pass for the parameters (with the EMA folded in). Every element is computed as torch computes it, in
the same order and rounding, so a member stays bitwise the single run that `torch.optim.Adam` trains
(tests/test_ensemble_adam.py). The optimizer's state is torch's: its checkpoints load either way.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .ops import extension  # loads isofast._C: torch.ops.isofast_C.adam_moments_ / adam_update_

__all__ = ["EnsembleAdam"]


class EnsembleAdam(torch.optim.Adam):
    """`torch.optim.Adam` (one parameter group, no weight decay, amsgrad or maximize) with `fused_step`.

    ``step()`` is torch's; `fused_step` needs the compiled CPU kernels (`isofast.ops.extension`) and
    float32 contiguous CPU parameters.
    """

    def __init__(self, params, lr: float, betas: tuple[float, float], eps: float) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, foreach=False)

    def _sqrt_buffer(self, p: torch.Tensor) -> torch.Tensor:
        # not state (the state_dict stays torch's), and made here rather than in __init__: Optimizer's pickling
        # keeps only defaults, state and param_groups
        buffers = self.__dict__.setdefault("_sqrt_buffers", {})
        buf = buffers.get(p)
        if buf is None or buf.shape != p.shape:
            buf = buffers[p] = torch.empty_like(p, memory_format=torch.contiguous_format)
        return buf

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
        # the second kernel's operands, checked before the first kernel writes: a refused step changes nothing
        for name, tensors in (("params", params), ("ema", ema)):
            for k, t in enumerate(tensors):
                if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
                    raise ValueError(f"{name}[{k}] must be a contiguous float32 CPU tensor, got {t.dtype} on "
                                     f"{t.device}{'' if t.is_contiguous() else ' (not contiguous)'}")
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
        # checks every tensor before it writes: a refused step leaves the state as it was
        torch.ops.isofast_C.adam_moments_(grads, exp_avgs, exp_avg_sqs, scale, beta1, beta2)
        for p in params:
            self.state[p]["step"] += 1
        step = float(self.state[params[0]]["step"])  # one step count: every member steps together
        # torch's sqrt (its values, not always the correctly rounded ones), into buffers kept between steps:
        # a fresh 6 MB allocation per step costs more than the sqrt
        sqrt_v = [self._sqrt_buffer(p) for p in params]
        for v, out in zip(exp_avg_sqs, sqrt_v, strict=True):
            torch.sqrt(v, out=out)
        step_size = group["lr"] / (1 - beta1 ** step)
        torch.ops.isofast_C.adam_update_(params, exp_avgs, sqrt_v, ema, step_size, (1 - beta2 ** step) ** 0.5,
                                         group["eps"], ema_weight)
