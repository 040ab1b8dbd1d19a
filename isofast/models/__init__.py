"""Noise-prediction networks: `TimeMLP` for 2D data, the DDPM `UNet` for images, and their registry."""

from isofast.models.authors_mlp import AuthorsMLP
from isofast.models.embedding import timestep_embedding
from isofast.models.mlp import TimeMLP
from isofast.models.registry import build_model, model_spec_of, parameter_count
from isofast.models.unet import UNET_CONFIGS, UNet, UNetConfig, build_unet

__all__ = ["AuthorsMLP", "TimeMLP", "UNet", "UNetConfig", "UNET_CONFIGS", "build_unet", "timestep_embedding", "build_model",
           "model_spec_of", "parameter_count"]
