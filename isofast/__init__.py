"""isofast: fast, checked training and sampling of DDPM models with the Iso-Diffusion objective.

The public names are imported on first use (PEP 562 ``__getattr__``): ``import isofast`` alone does not
import torch, so ``isofast --help`` and argument errors answer at once. ``from isofast import q_sample``
(or ``isofast.q_sample``) imports what that name needs, the compiled ops included.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

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

# public name -> the submodule that defines it
_HOME = {
    "iso_ddpm_loss": "ops", "q_sample": "ops", "ddpm_step": "ops", "ddim_step": "ops",
    "NoiseSchedule": "schedule", "NoiseKey": "noise", "isotropy": "reference", "LossParts": "reference",
}

if TYPE_CHECKING:  # what static tools see; at run time `__getattr__` imports these on demand
    from .noise import NoiseKey
    from .ops import ddim_step, ddpm_step, iso_ddpm_loss, q_sample
    from .reference import LossParts, isotropy
    from .schedule import NoiseSchedule


def __getattr__(name: str):
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
