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


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attr = _HOMES[name]
    return getattr(import_module(f"{__name__}.{module}"), attr)


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
