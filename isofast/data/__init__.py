"""Datasets: seeded 2D toy sets (`toy2d`), image datasets (`images`), and the trainer's data order (`order`).

The names below are imported on first use, so that the trainer's `isofast.data.order` does not pull in
scikit-learn and torchvision (every `isofast` command imports the trainer).
"""
from importlib import import_module

__all__ = ["DATASETS", "make_dataset", "IMAGE_DATASETS", "make_image_dataset", "make_dataloader"]

_HOMES = {
    "DATASETS": ("toy2d", "DATASETS"),
    "make_dataset": ("toy2d", "make_dataset"),
    "IMAGE_DATASETS": ("images", "DATASET_NAMES"),
    "make_image_dataset": ("images", "make_image_dataset"),
    "make_dataloader": ("images", "make_dataloader"),
}


_SUBMODULES = ("images", "order", "toy2d")


def __getattr__(name: str):
    if name in _HOMES:
        module, attr = _HOMES[name]
        return getattr(import_module(f"{__name__}.{module}"), attr)
    if name in _SUBMODULES:  # `isofast.data.toy2d` after a bare `import isofast.data`, as before
        return import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES, *_SUBMODULES})
