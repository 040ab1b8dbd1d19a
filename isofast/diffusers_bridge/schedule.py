"""A diffusers scheduler's config <-> `NoiseSchedule` (DDPMScheduler, DDIMScheduler: the same betas).

diffusers computes its tables in float32 (``torch.linspace(..., dtype=torch.float32)``); isofast computes
every schedule in float64 and rounds once (`isofast.schedule`). So a schedule read from a config is the
float64 schedule the config names: its betas round to diffusers' float32 betas (within 2 float32 ulps: the
two round the same float64 values at different points), and converting back and forth is exact in float64.

Names (diffusers ``beta_schedule`` -> isofast): "linear" -> linear(beta_start, beta_end), "scaled_linear"
-> scaled_linear(beta_start, beta_end), "squaredcos_cap_v2" -> cosine (s = 0.008, max_beta = 0.999, as
diffusers' ``betas_for_alpha_bar``); ``trained_betas`` -> `NoiseSchedule.from_betas`.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..schedule import NoiseSchedule
from . import require_diffusers

__all__ = ["BETA_SCHEDULES", "schedule_from_diffusers", "diffusers_config", "scheduler_from_schedule"]

# diffusers beta_schedule -> isofast schedule name
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
# the config fields that decide the betas, with diffusers' defaults (DDPMScheduler and DDIMScheduler agree)
_DEFAULTS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
             "trained_betas": None, "rescale_betas_zero_snr": False}
SCHEDULER_KINDS = ("ddpm", "ddim")


def _config_of(source: object) -> Mapping:
    config = getattr(source, "config", source)  # a scheduler, or its config (a dict / FrozenDict)
    if not isinstance(config, Mapping):
        raise TypeError("scheduler must be a diffusers scheduler (DDPMScheduler, DDIMScheduler) or its config "
                        f"(a mapping), got {type(source).__name__}")
    return config


def schedule_from_diffusers(source: object, dtype: torch.dtype = torch.float32) -> NoiseSchedule:
    """The `NoiseSchedule` of a diffusers scheduler or scheduler config (see the module docstring).

    Raises ValueError naming the field for a ``beta_schedule`` isofast has no equivalent of ("sigmoid",
    "laplace", ...), ``rescale_betas_zero_snr=True`` (alphas_cumprod[T-1] = 0: isofast's tables divide by
    it), or ``trained_betas`` whose length is not ``num_train_timesteps``.
    """
    config = {**_DEFAULTS, **{k: v for k, v in _config_of(source).items() if k in _DEFAULTS and v is not None}}
    T = config["num_train_timesteps"]
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"num_train_timesteps must be a positive int, got {T!r}")
    if config["rescale_betas_zero_snr"]:
        raise ValueError("rescale_betas_zero_snr=True is not supported: it makes alphas_cumprod[T-1] = 0 (zero "
                         "terminal SNR), and isofast's samplers divide by sqrt(alphas_cumprod)")
    if config["trained_betas"] is not None:
        betas = torch.as_tensor(config["trained_betas"], dtype=torch.float64)
        if betas.ndim != 1 or betas.numel() != T:
            raise ValueError(f"trained_betas must hold num_train_timesteps = {T} values, got shape {tuple(betas.shape)}")
        return NoiseSchedule.from_betas(betas, "custom", dtype)
    name = config["beta_schedule"]
    if name not in BETA_SCHEDULES:
        raise ValueError(f"beta_schedule {name!r} has no isofast equivalent; isofast reads beta_schedule "
                         f"{', '.join(repr(n) for n in BETA_SCHEDULES)}, or trained_betas")
    if name == "squaredcos_cap_v2":
        return NoiseSchedule.cosine(T, dtype=dtype)
    start, end = float(config["beta_start"]), float(config["beta_end"])
    return getattr(NoiseSchedule, BETA_SCHEDULES[name])(T, start, end, dtype=dtype)


def diffusers_config(sched: NoiseSchedule) -> dict[str, Any]:
    """The scheduler config fields that give ``sched``'s betas: a named ``beta_schedule`` when the betas are
    one (to float64 rounding), else ``trained_betas``; plus ``clip_sample=False`` and
    ``prediction_type="epsilon"``, as isofast's samplers (``clip_x0=False``) and its loss (eps-prediction)."""
    if not isinstance(sched, NoiseSchedule):
        raise TypeError(f"sched must be a NoiseSchedule, got {type(sched).__name__}")
    betas = sched.masters["betas"] if sched.masters else sched.betas.double().cpu()
    T, config = sched.T, {"num_train_timesteps": sched.T, "clip_sample": False, "prediction_type": "epsilon"}
    start, end = float(betas[0]), float(betas[-1])
    named = {"linear": lambda: NoiseSchedule.linear(T, start, end, torch.float64),
             "scaled_linear": lambda: NoiseSchedule.scaled_linear(T, start, end, torch.float64),
             "squaredcos_cap_v2": lambda: NoiseSchedule.cosine(T, dtype=torch.float64)}
    for name, make in named.items():
        try:
            candidate = make()
        except ValueError:  # e.g. a linear ramp to the cosine's 0.999 has non-finite tables: not this schedule
            continue
        if torch.allclose(candidate.betas, betas, rtol=1e-12, atol=0.0):
            fields = {} if name == "squaredcos_cap_v2" else {"beta_start": start, "beta_end": end}
            return {**config, "beta_schedule": name, **fields}
    return {**config, "beta_schedule": "linear", "trained_betas": betas.tolist()}


def scheduler_from_schedule(sched: NoiseSchedule, kind: str = "ddpm", **overrides: Any):
    """A diffusers DDPMScheduler (``kind="ddpm"``) or DDIMScheduler (``"ddim"``) with ``sched``'s betas;
    ``overrides``: further config fields (e.g. ``clip_sample=True``). An override of a field that decides the
    betas (``num_train_timesteps``, ``beta_schedule``, ...) to another value than the schedule's is refused
    (ValueError): the scheduler would silently noise and denoise with another schedule, or another T."""
    if kind not in SCHEDULER_KINDS:
        raise ValueError(f"kind must be one of {SCHEDULER_KINDS}, got {kind!r}")
    config = diffusers_config(sched)
    for field in _DEFAULTS:
        ours = config.get(field, _DEFAULTS[field])
        if field in overrides and overrides[field] != ours:
            what = f"the schedule's T = {sched.T}" if field == "num_train_timesteps" else f"the schedule's {ours!r}"
            raise ValueError(f"overrides {field}={overrides[field]!r} differs from {what}: the scheduler's betas come "
                             f"from the schedule (fields {', '.join(_DEFAULTS)}); make a NoiseSchedule of the betas "
                             "you want instead")
    diffusers = require_diffusers("NoiseSchedule.to_diffusers")
    cls = diffusers.DDPMScheduler if kind == "ddpm" else diffusers.DDIMScheduler
    return cls.from_config({**config, **overrides})
