"""isofast: fast, checked training and sampling of DDPM models with the Iso-Diffusion objective."""
from .noise import NoiseKey
from .ops import ddim_step, ddpm_step, iso_ddpm_loss, q_sample
from .reference import LossParts, isotropy
from .schedule import NoiseSchedule

__version__ = "0.1.0"

__all__ = [
    "iso_ddpm_loss",
    "q_sample",
    "NoiseSchedule",
    "NoiseKey",
    "ddpm_step",
    "ddim_step",
    "isotropy",
    "LossParts",
    "__version__",
]
