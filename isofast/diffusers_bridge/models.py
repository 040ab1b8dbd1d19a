"""A diffusers `UNet2DModel` as an isofast model: ``model(x_t, t) -> eps_pred``, a tensor.

isofast's trainer and samplers call ``model(x_t, t)`` and expect the noise prediction itself; a
UNet2DModel returns a `UNet2DOutput` whose ``.sample`` is that prediction. `DiffusersUNet2D` wraps one
and returns ``.sample``; being an `nn.Module`, it also tells the samplers its device. The registry records
it as ``{"kind": "diffusers_unet2d", "config": <the UNet2DModel config>}`` (`isofast.models.registry`), so
checkpoints rebuild it without the code that made it.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import require_diffusers

__all__ = ["DiffusersUNet2D", "check_timesteps", "declared_timesteps", "load_unet2d_config", "unet2d_sample_shape"]


class DiffusersUNet2D(nn.Module):
    """``forward(x_t (B, C, H, W), t int64 (B,)) -> unet(x_t, t).sample`` (B, C, H, W).

    Build it from a config (``DiffusersUNet2D(config)``: a `UNet2DModel` config mapping, no download) or
    around an existing model (``DiffusersUNet2D(unet=unet)``).
    """

    def __init__(self, config: Mapping[str, Any] | None = None, *, unet: nn.Module | None = None) -> None:
        super().__init__()
        if (config is None) == (unet is None):
            raise ValueError("give exactly one of config (a UNet2DModel config) or unet (a UNet2DModel)")
        if unet is None:
            diffusers = require_diffusers("a diffusers UNet2DModel")
            if not isinstance(config, Mapping):
                raise ValueError(f"UNet2DModel config must be a mapping, got {type(config).__name__}")
            try:
                unet = diffusers.UNet2DModel.from_config(dict(config))
            except (TypeError, ValueError, KeyError) as exc:  # diffusers' own message names the field
                raise ValueError(f"invalid UNet2DModel config: {exc}") from exc
        self.unet = unet

    @property
    def config(self) -> dict[str, Any]:
        """The UNet2DModel's config as JSON data (diffusers' private "_..." fields left out)."""
        return {k: v for k, v in json.loads(json.dumps(dict(self.unet.config))).items() if not k.startswith("_")}

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x_t, t).sample


def declared_timesteps(model: object) -> int | None:
    """The ``num_train_timesteps`` a diffusers model's config declares (a `DiffusersUNet2D`, a `UNet2DModel` or
    the config mapping itself), or None: unset, or not a model with a config mapping (isofast's own models).

    A UNet2DModel uses it as the size of its "learned" time embedding, and whoever loads the model reads it as
    the T it was trained for; isofast's models take any t and declare nothing."""
    config = model if isinstance(model, Mapping) else getattr(model, "config", None)
    return config.get("num_train_timesteps") if isinstance(config, Mapping) else None


def check_timesteps(model: object, T: int, t_name: str, source: str = "the model's UNet2DModel config") -> None:
    """Refuse a model whose config declares ``num_train_timesteps`` other than ``T``, the schedule's (named
    ``t_name`` in the message, e.g. "--T"): trained or sampled with another T, its timestep t means another
    noise level than the one it declares, silently (or, past a "learned" embedding's rows, an IndexError)."""
    declared = declared_timesteps(model)
    if declared is not None and declared != T:
        raise ValueError(f"{t_name} is {T}, but {source} declares num_train_timesteps {declared}: the model and "
                         f"the noise schedule must have the same T (use a schedule of T = {declared}, or a model "
                         "config without num_train_timesteps)")


def unet2d_sample_shape(config: Mapping[str, Any]) -> tuple[int, int, int]:
    """(in_channels, H, W) of one sample of a UNet2DModel config (``sample_size``: an int or [H, W])."""
    size = config.get("sample_size")
    channels = config.get("in_channels", 3)
    hw = (size, size) if isinstance(size, int) and not isinstance(size, bool) else tuple(size or ())
    if len(hw) != 2 or not all(isinstance(s, int) and s >= 1 for s in hw):
        raise ValueError(f"UNet2DModel config needs sample_size, a positive int or [H, W], got {size!r}")
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"UNet2DModel config's in_channels must be a positive int, got {channels!r}")
    return channels, hw[0], hw[1]


def load_unet2d_config(path: str | Path) -> dict[str, Any]:
    """A UNet2DModel config from a local JSON file (e.g. a model folder's config.json); checked for a
    sample shape (`unet2d_sample_shape`)."""
    path = Path(path)
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"--model-config {path}: no such file") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"--model-config {path}: not a readable JSON file ({exc})") from exc
    if not isinstance(config, dict):
        raise ValueError(f"--model-config {path}: expected a JSON object (a UNet2DModel config), got "
                         f"{type(config).__name__}")
    unet2d_sample_shape(config)
    return config
