"""The context a loss of each prediction type needs, from the `NoiseKey` of `q_sample` or the keywords.

eps-prediction needs nothing beyond the noise; v- and x0-prediction need x0, the timesteps t and the
schedule (their target and implied eps are built from x0, eps and ab_t); min-SNR weights need t and the
schedule. The key `q_sample` returns carries all three (`NoiseKey.t`, ``.schedule``, ``.x0``); the
keywords ``x0=``, ``t=``, ``schedule=`` of `iso_ddpm_loss` supply them for a noise tensor, or override
the key's. A missing piece is a ValueError that names the keyword and where it comes from.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..noise import NoiseKey
from . import validation


class LossContext(NamedTuple):
    """What the loss uses beyond the noise: each None where the prediction type and weighting need none."""

    x0: torch.Tensor | None
    t: torch.Tensor | None
    schedule: object  # NoiseSchedule | None


NO_CONTEXT = LossContext(None, None, None)


def loss_context(
    noise: torch.Tensor | NoiseKey,
    pred: torch.Tensor,
    prediction_type: str,
    snr_gamma: float | None,
    x0: torch.Tensor | None,
    t: torch.Tensor | int | None,
    schedule: object,
) -> LossContext:
    """The checked context of a loss of ``prediction_type`` (and min-SNR when ``snr_gamma``) for ``pred``.

    Explicit keywords win over the key's context; the key's were checked by `q_sample` when it made them.
    """
    needs_x0 = prediction_type != "epsilon"
    if not needs_x0 and snr_gamma is None:
        return NO_CONTEXT
    key = noise if isinstance(noise, NoiseKey) else None
    why = f"prediction_type={prediction_type!r}" if needs_x0 else "snr_gamma"
    if schedule is not None:
        validation.schedule(schedule, "schedule")
    else:
        schedule = _from_key(key, "schedule", why)
    if t is not None:
        t = validation.timesteps("t", t, pred.shape[0], schedule.T, pred.device)
    else:
        t = _from_key(key, "t", why)  # (B,) on the data device: the key has the shape and device of pred
        if schedule is not key.schedule and schedule.T != key.schedule.T:
            raise ValueError(f"schedule has T={schedule.T} but the NoiseKey's t comes from a schedule of "
                             f"T={key.schedule.T}: pass t= too")
    if not needs_x0:
        return LossContext(None, t, schedule)
    if x0 is not None:
        x0 = validation.float_tensor("x0", x0)
        validation.same_shape("x0", x0, "eps_pred", pred)
        validation.same_device("x0", x0.device, "eps_pred", pred.device)
    else:
        x0 = _from_key(key, "x0", why)
        validation.same_shape("x0 (from the NoiseKey)", x0, "eps_pred", pred)
    return LossContext(x0, t, schedule)


def _from_key(key: NoiseKey | None, name: str, why: str):
    value = None if key is None else getattr(key, name)
    if value is None:
        source = ("the noise is a tensor" if key is None
                  else "the NoiseKey carries none (only the key q_sample returns does)")
        raise ValueError(f"{why} needs {name} ({_WHAT[name]}), but {source}: pass {name}=..., or the NoiseKey "
                         "that q_sample returned")
    return value


_WHAT = {"x0": "the clean data q_sample noised", "t": "the timesteps", "schedule": "the NoiseSchedule"}
