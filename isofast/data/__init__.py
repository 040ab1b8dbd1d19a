"""Datasets: seeded 2D toy sets (:mod:`isofast.data.toy2d`)."""

from isofast.data.toy2d import DATASETS, make_dataset

__all__ = ["DATASETS", "make_dataset"]
