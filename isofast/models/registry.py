"""The model registry: a model's architecture as JSON (`model_spec_of`) and back (`build_model`).

Checkpoints record the spec next to the weights (``state.json``'s ``model_spec``), so a trained model
can be rebuilt without the code that built it (`isofast.checkpoint.load_trained_model`)::

    {"kind": "mlp",  "config": {"data_dim": 2, "hidden": 128, "n_layers": 3, "emb_dim": 128, "max_period": 10000.0}}
    {"kind": "unet", "config": {...every field of UNetConfig...}}
"""
from __future__ import annotations

import dataclasses

from torch import nn

from .mlp import TimeMLP
from .unet import UNet, UNetConfig

__all__ = ["build_model", "model_spec_of"]


def model_spec_of(model: nn.Module) -> dict | None:
    """A JSON description from which `build_model` rebuilds ``model``'s architecture (None if unknown)."""
    if isinstance(model, TimeMLP):
        return {"kind": "mlp", "config": {"data_dim": model.data_dim, "hidden": model.hidden,
                                          "n_layers": model.n_layers, "emb_dim": model.emb_dim,
                                          "max_period": model.max_period}}
    if isinstance(model, UNet):
        return {"kind": "unet", "config": dataclasses.asdict(model.config)}
    return None


def build_model(spec: dict) -> nn.Module:
    """The (untrained) model a `model_spec_of` description describes."""
    if not isinstance(spec, dict) or "kind" not in spec:
        raise ValueError(f"model spec must be a dict with a 'kind', got {spec!r}")
    if spec["kind"] == "mlp":
        return TimeMLP(**spec.get("config", {}))
    if spec["kind"] == "unet":
        return UNet(UNetConfig(**spec["config"]))
    raise ValueError(f"unknown model kind {spec['kind']!r} in model spec (known: 'mlp', 'unet')")
