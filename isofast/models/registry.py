"""The model registry: a model's architecture as JSON (`model_spec_of`) and back (`build_model`).

Checkpoints record the spec next to the weights (``state.json``'s ``model_spec``), so a trained model
can be rebuilt without the code that built it (`isofast.checkpoint.load_trained_model`)::

    {"kind": "mlp",  "config": {"data_dim": 2, "hidden": 128, "n_layers": 3, "emb_dim": 128, "max_period": 10000.0}}
    {"kind": "authors_mlp", "config": {"data_dim": 2, "hidden": 128, "n_layers": 3, "emb_dim": 50}}
    {"kind": "unet", "config": {...every field of UNetConfig...}}
"""
from __future__ import annotations

import dataclasses

from torch import nn

from .authors_mlp import AuthorsMLP
from .mlp import TimeMLP
from .unet import UNet, UNetConfig

__all__ = ["MODELS_2D", "build_model", "build_model_2d", "model_spec_of"]

# The 2-D noise predictors by the name `isofast toy2d --model` takes: isofast's own and the authors' 2024 one.
MODELS_2D = {"mlp": TimeMLP, "authors_mlp": AuthorsMLP}


def build_model_2d(name: str, data_dim: int = 2) -> nn.Module:
    """A fresh 2-D model of :data:`MODELS_2D` (its default sizes), initialised from torch's global RNG."""
    if name not in MODELS_2D:
        raise ValueError(f"unknown model name {name!r}; valid names: {', '.join(MODELS_2D)}")
    return MODELS_2D[name](data_dim=data_dim)


def model_spec_of(model: nn.Module) -> dict | None:
    """A JSON description from which `build_model` rebuilds ``model``'s architecture (None if unknown)."""
    if isinstance(model, TimeMLP):
        return {"kind": "mlp", "config": {"data_dim": model.data_dim, "hidden": model.hidden,
                                          "n_layers": model.n_layers, "emb_dim": model.emb_dim,
                                          "max_period": model.max_period}}
    if isinstance(model, AuthorsMLP):
        return {"kind": "authors_mlp", "config": {"data_dim": model.data_dim, "hidden": model.hidden,
                                                  "n_layers": model.n_layers, "emb_dim": model.emb_dim}}
    if isinstance(model, UNet):
        return {"kind": "unet", "config": dataclasses.asdict(model.config)}
    return None


def build_model(spec: dict) -> nn.Module:
    """The (untrained) model a `model_spec_of` description describes."""
    if not isinstance(spec, dict) or "kind" not in spec:
        raise ValueError(f"model spec must be a dict with a 'kind', got {spec!r}")
    if spec["kind"] == "mlp":
        return TimeMLP(**spec.get("config", {}))
    if spec["kind"] == "authors_mlp":
        return AuthorsMLP(**spec.get("config", {}))
    if spec["kind"] == "unet":
        return UNet(UNetConfig(**spec["config"]))
    raise ValueError(f"unknown model kind {spec['kind']!r} in model spec (known: 'mlp', 'authors_mlp', 'unet')")
