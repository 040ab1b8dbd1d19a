"""Argument checks shared by every op, so that all backends raise the same clear errors.

Every check names the argument and what was expected. Value checks on timesteps read the
tensor: free for CPU timesteps (which may accompany GPU data: pass them so in hot loops), a
host sync for CUDA ones; skipped while a CUDA graph is being captured or torch.compile traces
(the kernels then trust their inputs), and skippable with ISOFAST_CHECK_VALUES=0.
"""
from __future__ import annotations

import math
import os

import torch

from .. import scalars
from ..noise import NoiseKey

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
ISO_MODES = ("batch", "sample")
REDUCTIONS = ("mean", "sum", "none")


def float_tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have a floating dtype (float32, float64, float16, bfloat16), got {x.dtype}")
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"{name} must have a non-empty batch dimension, got shape {tuple(x.shape)}")
    if math.prod(x.shape[1:]) == 0:  # not x[0].numel(): indexing builds a view, ~5 us a call
        raise ValueError(f"{name} must have at least one element per sample, got shape {tuple(x.shape)}")
    return x


def same_shape(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor | NoiseKey) -> None:
    if tuple(x.shape) != tuple(ref.shape):
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(x.shape)}")


def same_dtype(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {x.dtype}")


def same_device(name: str, device: torch.device, ref_name: str, ref_device: torch.device) -> None:
    if torch.device(device) != torch.device(ref_device):
        raise ValueError(f"{name} is on {device} but {ref_name} is on {ref_device}; put them on the same device")


def _check_values_now(x: torch.Tensor) -> bool:
    if os.environ.get("ISOFAST_CHECK_VALUES", "1") == "0":
        return False
    if torch.compiler.is_compiling():
        return False
    return not (x.is_cuda and torch.cuda.is_current_stream_capturing())


def timesteps(name: str, t: object, batch: int, T: int, device: torch.device) -> torch.Tensor:
    """Return t as an int64 (batch,) tensor on ``device``; ints (numpy's too) broadcast to the batch."""
    if isinstance(t, bool):
        raise TypeError(f"{name} must be an int or an integer tensor, got bool")
    low = -1 if name == "t_prev" else 0  # t_prev = -1: the DDIM jump to x_0
    if scalars.is_integer(t):
        t = int(t)
        if not low <= t < T:
            raise ValueError(f"{name} must be in [{low}, {T}), got {t}")
        return torch.full((batch,), t, dtype=torch.int64, device=device)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be an int or an integer tensor, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype, got {t.dtype}")
    if t.ndim == 0:
        t = t.expand(batch)
    if tuple(t.shape) != (batch,):
        raise ValueError(f"{name} must have shape ({batch},) (one timestep per sample), got {tuple(t.shape)}")
    # CPU timesteps for GPU data are allowed: checking them costs no device sync, then one small copy.
    if t.device.type != "cpu":
        same_device(name, t.device, "the data", device)
    if _check_values_now(t):
        t_min, t_max = torch.stack(torch.aminmax(t)).tolist()  # one reduction, one read (one sync on a GPU)
        if t_min < low or t_max >= T:
            raise ValueError(f"{name} must be in [{low}, {T}), got values in [{t_min}, {t_max}]")
    return t.to(device=device, dtype=torch.int64, non_blocking=True).contiguous()


def steps_back(t: torch.Tensor, t_prev: torch.Tensor) -> None:
    """A DDIM jump goes back in time: t_prev < t for every sample (t_prev = -1: the jump to x_0)."""
    if not _check_values_now(t):
        return
    forward = t_prev >= t
    if bool(forward.any()):
        b = int(forward.nonzero()[0, 0])
        raise ValueError(f"t_prev must be < t (a DDIM step goes back in time; t_prev = -1 jumps to x_0), "
                         f"got t_prev[{b}] = {int(t_prev[b])} >= t[{b}] = {int(t[b])}")


def finite_nonnegative(name: str, value: object) -> float:
    """A finite real scalar >= 0 (int, float or numpy scalar) as a Python float."""
    value = scalars.real(name, value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    return value


def positive_finite(name: str, value: object) -> float:
    """A finite real scalar > 0 (int, float or numpy scalar) as a Python float."""
    value = scalars.real(name, value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return value


def iso_lambda(value: object, groups: int = 1, device: torch.device | None = None) -> float | torch.Tensor:
    """A float >= 0, or with ``groups`` G > 1 also a (G,) float tensor of such values (one per group)."""
    if isinstance(value, torch.Tensor) and groups > 1:
        if not value.dtype.is_floating_point or tuple(value.shape) != (groups,):
            raise ValueError(f"iso_lambda as a tensor must be a float tensor of shape ({groups},) (one per group), "
                             f"got {value.dtype} of shape {tuple(value.shape)}")
        same_device("iso_lambda", value.device, "eps_pred", device)
        if _check_values_now(value) and not bool(torch.isfinite(value).all() & (value >= 0).all()):
            raise ValueError(f"iso_lambda must be finite and >= 0, got {value.tolist()}")
        return value
    if isinstance(value, torch.Tensor):
        raise TypeError("iso_lambda must be a float (a tensor only with groups > 1, one value per group)")
    return finite_nonnegative("iso_lambda", value)


def groups(value: object, batch: int) -> int:
    """The number of equal groups the batch splits into (a positive int dividing it)."""
    if not scalars.is_integer(value) or value < 1:
        raise TypeError(f"groups must be a positive int, got {value!r}")
    value = int(value)
    if batch % value:
        raise ValueError(f"groups={value} must divide the batch size {batch} (equal groups)")
    return value


def flag(name: str, value: object) -> bool:
    """A bool (numpy's too): a string such as "no" would be truthy, so anything else is refused."""
    if not scalars.is_bool(value):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def choice(name: str, value: object, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value  # type: ignore[return-value]


def weights(w: object, batch: int, device: torch.device) -> torch.Tensor | None:
    if w is None:
        return None
    if not isinstance(w, torch.Tensor) or not w.dtype.is_floating_point:
        raise TypeError(f"weights must be a floating torch.Tensor of shape ({batch},), got {type(w).__name__}")
    if tuple(w.shape) != (batch,):
        raise ValueError(f"weights must have shape ({batch},) (one weight per sample), got {tuple(w.shape)}")
    same_device("weights", w.device, "eps_pred", device)
    return w


def noise_for(noise: object, like: torch.Tensor, name: str = "noise") -> torch.Tensor | NoiseKey:
    """Check that a NoiseKey or tensor describes noise for ``like`` (same shape and device)."""
    if isinstance(noise, NoiseKey):
        same_shape(f"{name} (NoiseKey)", noise, "the data", like)
        same_device(f"{name} (NoiseKey)", noise.device, "the data", like.device)
        return noise
    if isinstance(noise, torch.Tensor):
        float_tensor(name, noise)
        same_shape(name, noise, "the data", like)
        same_device(name, noise.device, "the data", like.device)
        return noise
    raise TypeError(f"{name} must be a NoiseKey or a torch.Tensor, got {type(noise).__name__}")


def schedule(sched: object, name: str = "sched") -> None:
    from ..schedule import NoiseSchedule

    if not isinstance(sched, NoiseSchedule):
        raise TypeError(f"{name} must be a NoiseSchedule, got {type(sched).__name__}")
