"""Noise-prediction networks: :class:`TimeMLP` for 2D data (the UNet for images lives beside it)."""

from isofast.models.embedding import timestep_embedding
from isofast.models.mlp import TimeMLP

__all__ = ["TimeMLP", "timestep_embedding"]
