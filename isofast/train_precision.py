"""The trainer's precision: autocast of the model's forward and, for fp16, the loss scaler.

bf16 keeps fp32's exponent range, so autocast alone serves. fp16 does not: gradients below ~6e-8 flush
to zero. So in fp16 the loss is multiplied by a scale S before backward and the gradients divided by S
before clipping and the optimizer (`torch.amp.GradScaler` of the training device's type). A step whose
gradients hold an inf or NaN is *skipped* (the optimizer does not move, the weights stay as they were)
and S halves; after 2000 steps in a row without one, S doubles. A skipped step is the scaler finding its
range, not a failure: the trainer counts it (metrics.csv ``skipped_steps``) and carries on. S and its
counter are part of the checkpoint, so a resumed run continues with the scale it had. Only a run of
`MAX_SKIPPED_IN_A_ROW` skipped steps is a failure: by then S has fallen by 2^50, so the gradients are not
merely large but inf/NaN at any scale (a diverged model, or a forward that overflows float16).
"""
from __future__ import annotations

import contextlib

import torch

__all__ = ["AUTOCAST_DTYPES", "MAX_SKIPPED_IN_A_ROW", "MixedPrecision"]

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Finding the scale from 2^16 skips a handful of steps (one per halving); 50 in a row is divergence.
MAX_SKIPPED_IN_A_ROW = 50


class MixedPrecision:
    """The autocast and (fp16) loss scaling of ``precision`` ("fp32" | "bf16" | "fp16") on ``device``.

    One optimizer step: ``backward(loss)`` per micro-batch, then ``unscale(optimizer)`` (before clipping),
    then ``step(optimizer)``, which returns False when fp16 gradients overflowed and the step was skipped
    (and raises FloatingPointError after `MAX_SKIPPED_IN_A_ROW` skips in a row). Without a scaler these are
    plain ``loss.backward()`` and ``optimizer.step()``.
    """

    def __init__(self, precision: str, device: torch.device) -> None:
        if precision not in AUTOCAST_DTYPES:
            raise ValueError(f"precision must be one of {tuple(AUTOCAST_DTYPES)}, got {precision!r}")
        self.precision, self.device = precision, torch.device(device)
        self.dtype = AUTOCAST_DTYPES[precision]
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None
        self.skipped_in_a_row = 0

    def autocast(self):
        """The context of the model's forward (none in fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the accumulated gradients by the scale, so clipping sees the true norm (once per step)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """``optimizer.step()`` unless fp16 gradients overflowed; returns whether the step was taken."""
        if self.scaler is None:
            optimizer.step()
            return True
        # The scaler already reads its inf flag on the host to decide the skip, so this costs no extra sync
        # worth naming; the scale shrinks on update exactly when the step was skipped (backoff factor < 1).
        before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        taken = self.scaler.get_scale() >= before
        self.skipped_in_a_row = 0 if taken else self.skipped_in_a_row + 1
        if self.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
            raise FloatingPointError(
                f"{self.skipped_in_a_row} fp16 steps in a row were skipped: their gradients held inf/NaN down to a "
                f"loss scale of {self.scaler.get_scale():.3g}, so the model diverged or its forward overflows "
                "float16; try --precision bf16 or fp32, a lower lr, or grad_clip")
        return taken

    @property
    def scale(self) -> float | None:
        """The current loss scale (None without a scaler)."""
        return self.scaler.get_scale() if self.scaler is not None else None

    def state_dict(self) -> dict | None:
        """The scaler's state for a checkpoint (None without one)."""
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: dict | None) -> None:
        """Restore a checkpoint's scaler state; none recorded (an fp32/bf16 checkpoint): the scaler starts afresh."""
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
