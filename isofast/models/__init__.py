"""Noise-prediction networks: `TimeMLP` for 2D data, the DDPM `UNet` for images."""

from isofast.models.embedding import timestep_embedding
from isofast.models.mlp import TimeMLP
from isofast.models.unet import UNET_CONFIGS, UNet, UNetConfig, build_unet

__all__ = ["TimeMLP", "UNet", "UNetConfig", "UNET_CONFIGS", "build_unet", "timestep_embedding"]
