"""The model registry: a model's architecture as JSON (`model_spec_of`) and back (`build_model`).

Checkpoints record the spec next to the weights (``state.json``'s ``model_spec``), so a trained model
can be rebuilt without the code that built it (`isofast.checkpoint.load_trained_model`)::

    {"kind": "mlp",  "config": {"data_dim": 2, "hidden": 128, "n_layers": 3, "emb_dim": 128, "max_period": 10000.0}}
    {"kind": "authors_mlp", "config": {"data_dim": 2, "hidden": 128, "n_layers": 3, "emb_dim": 50}}
    {"kind": "unet", "config": {...every field of UNetConfig...}}
    {"kind": "diffusers_unet2d", "config": {...a diffusers UNet2DModel config...}}   (needs diffusers)

A spec is data from a file, so `build_model` sizes it before allocating anything: it builds the model on
PyTorch's "meta" device (shapes only, no memory) and refuses more than `MAX_PARAMETERS` parameters or
`MAX_BLOCKS` layers/blocks. 2^31 parameters are 8 GiB of float32 weights, before the EMA copy and Adam's two
moments (four times that in all): far above every model isofast trains (DDPM's CIFAR-10 UNet has 35.7M).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..diffusers_bridge.models import DiffusersUNet2D
from .authors_mlp import AuthorsMLP
from .mlp import TimeMLP
from .unet import UNet, UNetConfig

__all__ = ["KINDS", "MAX_BLOCKS", "MAX_PARAMETERS", "MODELS_2D", "build_model", "build_model_2d", "model_spec_of",
           "parameter_count"]

MAX_PARAMETERS = 2**31
MAX_BLOCKS = 4096  # MLP layers, or UNet levels x blocks per level: beyond this even the meta build is slow

# The 2-D noise predictors by the name `isofast toy2d --model` takes: isofast's own and the authors' 2024 one.
MODELS_2D = {"mlp": TimeMLP, "authors_mlp": AuthorsMLP}
KINDS = (*MODELS_2D, "unet", "diffusers_unet2d")  # every kind a model spec may name


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
    if isinstance(model, DiffusersUNet2D):
        return {"kind": "diffusers_unet2d", "config": model.config}
    return None


def _construct(spec: dict) -> nn.Module:
    if not isinstance(spec, dict) or "kind" not in spec:
        raise ValueError(f"model spec must be a dict with a 'kind', got {spec!r}")
    config = spec.get("config", {})
    if not isinstance(config, dict):
        raise ValueError(f"model spec's 'config' must be a dict, got {type(config).__name__}")
    kind = spec["kind"]
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r} in model spec (known: {', '.join(KINDS)})")
    try:
        if kind in MODELS_2D:
            blocks = config.get("n_layers", 1)
        elif kind == "unet":
            blocks = len(config.get("channel_mult", ())) * (config.get("num_res_blocks", 1) + 1)
        else:
            blocks = len(config.get("block_out_channels", ())) * (config.get("layers_per_block", 2) + 1)
        if isinstance(blocks, int) and blocks > MAX_BLOCKS:
            raise ValueError(f"model spec asks for {blocks} layers/blocks; isofast builds at most {MAX_BLOCKS}")
        if kind in MODELS_2D:
            return MODELS_2D[kind](**config)
        return UNet(UNetConfig(**config)) if kind == "unet" else DiffusersUNet2D(config)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"model spec {kind!r} is invalid: {exc}") from exc


def parameter_count(spec: dict) -> int:
    """Number of parameters of the model ``spec`` describes, counted without allocating them."""
    with torch.device("meta"):
        model = _construct(spec)
    return sum(p.numel() for p in model.parameters())


def build_model(spec: dict) -> nn.Module:
    """The (untrained) model a `model_spec_of` description describes.

    Raises ValueError for an invalid spec, or one of more than `MAX_PARAMETERS` parameters (counted first,
    without allocating them).
    """
    count = parameter_count(spec)
    if count > MAX_PARAMETERS:
        raise ValueError(f"model spec asks for about {count:.1e} parameters ({4 * count / 2**30:,.0f} GiB of "
                         f"float32 weights); isofast refuses more than 2^31 = {MAX_PARAMETERS:.2e}: is the spec "
                         f"(state.json's model_spec, or model.json) damaged? {spec!r}"[:600])
    return _construct(spec)
