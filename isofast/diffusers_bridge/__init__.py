"""isofast <-> HuggingFace diffusers: schedules, UNet2DModel training, DDPMPipeline export.

Nothing here imports diffusers at module level: `isofast` works without it, and the parts that need it
call `require_diffusers`, which names the extra to install.
"""
from __future__ import annotations

import importlib
from types import ModuleType

INSTALL_HINT = 'pip install "isofast[diffusers]"  (or: pip install diffusers)'


class DiffusersMissingError(ImportError):
    """diffusers is not installed; the message says what to install."""


def require_diffusers(what: str) -> ModuleType:
    """The `diffusers` module, or DiffusersMissingError saying that ``what`` needs it and how to install it."""
    try:
        return importlib.import_module("diffusers")
    except ImportError as exc:
        raise DiffusersMissingError(f"{what} needs HuggingFace diffusers, which is not installed: "
                                    f"{INSTALL_HINT}") from exc
