"""Datasets: seeded 2D toy sets (`toy2d`) and image datasets (`images`)."""

from isofast.data.images import DATASET_NAMES as IMAGE_DATASETS
from isofast.data.images import make_dataloader, make_image_dataset
from isofast.data.toy2d import DATASETS, make_dataset

__all__ = ["DATASETS", "make_dataset", "IMAGE_DATASETS", "make_image_dataset", "make_dataloader"]
