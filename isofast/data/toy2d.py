"""Seeded 2D toy datasets: the four of the Iso-Diffusion paper and three classic ones.

``make_dataset(name, n_points=10_000, seed=0)`` (or ``DATASETS[name](n_points, seed)``) returns a
float32 CPU tensor of shape (n_points, 2) whose points all lie in [-1, 1]^2. Names: swiss_roll,
moon_scatter, moon_circles, central_banana (the paper's), moons, circles, gaussians8.

Scaling to [-1, 1]: each dataset is generated in its natural coordinates, then each column is
mapped by the affine map ``x -> 2 (x - min) / (max - min) - 1`` with min/max taken over the
generated set itself (the authors' ``MinMaxScaler(feature_range=(-1, 1))``). So the extreme
points sit exactly on the border, and the map differs slightly from seed to seed.

Sizes: the paper's datasets are 10,000 points, some with parts of 500 points. For other
``n_points`` each 500-point part becomes ``round(500 * n_points / 10_000)`` points (5 %, rounded
half up) and the main part takes the rest, so the total is always ``n_points``.

Determinism: all randomness comes from ``numpy.random.default_rng(seed)`` (sklearn generators get
an integer seed drawn from it), so a (name, n_points, seed) triple always gives the same tensor.
Rows are shuffled, so any prefix is an unbiased subsample.

Each dataset is one function ``_parts_<name>(n_points, rng)`` that draws its parts in natural
coordinates (a list of float64 (n_i, 2) arrays, one per part, in the order documented there);
`make_dataset` checks the arguments, seeds the generator and hands the parts to ``_to_unit_square``.
The tests check the geometry of the parts and the scaling separately.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch
from sklearn.datasets import make_circles, make_moons, make_swiss_roll

__all__ = ["DATASETS", "DATA_NOISE", "make_dataset"]

DEFAULT_N_POINTS = 10_000


def _check_args(n_points: int, seed: int) -> None:
    if isinstance(n_points, bool) or not isinstance(n_points, (int, np.integer)) or n_points < 2:
        raise ValueError(f"n_points must be an int >= 2, got {n_points!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")


def _part_size(n_points: int, size_at_10k: int = 500) -> int:
    """round(size_at_10k * n_points / 10_000), halves rounded up (500 at the paper's 10,000)."""
    return (size_at_10k * n_points + DEFAULT_N_POINTS // 2) // DEFAULT_N_POINTS


def _sklearn_seed(rng: np.random.Generator) -> int:
    return int(rng.integers(0, 2**31 - 1))


def _to_unit_square(parts: list[np.ndarray], rng: np.random.Generator) -> torch.Tensor:
    """Stack the parts, shuffle rows, min-max scale each column to [-1, 1] (float64), return float32 (N, 2)."""
    x = np.concatenate(parts)
    x = x[rng.permutation(x.shape[0])]
    lo = x.min(axis=0)
    span = x.max(axis=0) - lo
    # A constant column (possible only for degenerate tiny sets) maps to 0 instead of dividing by 0.
    scale = np.where(span > 0, 2.0 / np.where(span > 0, span, 1.0), 0.0)
    y = (x - lo) * scale - np.where(span > 0, 1.0, 0.0)
    # Rounding can overshoot the border by an ulp; clipping keeps the documented range exact.
    y = np.clip(y, -1.0, 1.0)
    return torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32))


def _crescent(n: int, noise: float, rng: np.random.Generator) -> np.ndarray:
    """n points of the upper crescent of ``make_moons`` (label 0: x in [-1, 1], y in [0, 1] + noise)."""
    x, y = make_moons(n_samples=2 * n, noise=noise, random_state=_sklearn_seed(rng))
    return x[y == 0]


def _parts_swiss_roll(n_points: int, rng: np.random.Generator, noise: float = 0.5) -> list[np.ndarray]:
    """Swiss roll seen from its axis: sklearn ``make_swiss_roll(n_points, noise=0.5)``, columns 0 and 2."""
    x, _ = make_swiss_roll(n_samples=n_points, noise=noise, random_state=_sklearn_seed(rng))
    return [x[:, [0, 2]]]


def _parts_moon_scatter(n_points: int, rng: np.random.Generator, noise: float = 0.1) -> list[np.ndarray]:
    """Moon with scatterings: one crescent plus a cloud of points scattered around it.

    Parts (at n_points = 10,000): 9,500 points of the upper crescent of ``make_moons(noise=0.1)``;
    500 scatter points, each a distinct crescent point (chosen at random) moved by ``0.3 * N(0, I_2)``.
    """
    n_scatter = _part_size(n_points)
    crescent = _crescent(n_points - n_scatter, noise, rng)
    anchors = crescent[rng.choice(crescent.shape[0], size=n_scatter, replace=False)]
    return [crescent, anchors + 0.3 * rng.standard_normal((n_scatter, 2))]


def _parts_moon_circles(n_points: int, rng: np.random.Generator, noise: float = 0.1) -> list[np.ndarray]:
    """Moon with two circles: one crescent plus two small filled discs below its tips.

    Parts (at n_points = 10,000): 9,000 points of the upper crescent of ``make_moons(noise=0.1)``;
    two discs of 500 points each, centred at (-1.5, -1.0) and (1.5, -1.0), points uniform in area
    over radii 0.01 .. 0.25 (radius = sqrt(U(0.01^2, 0.25^2)), angle = U(0, 2 pi)).
    """
    n_disc = _part_size(n_points)
    parts = [_crescent(n_points - 2 * n_disc, noise, rng)]
    for centre in ((-1.5, -1.0), (1.5, -1.0)):
        angle = rng.uniform(0.0, 2.0 * np.pi, n_disc)
        radius = np.sqrt(rng.uniform(0.01**2, 0.25**2, n_disc))
        parts.append(np.stack([centre[0] + radius * np.cos(angle), centre[1] + radius * np.sin(angle)], axis=1))
    return parts


def _parts_central_banana(n_points: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Central banana: a curved tail that thins out away from the origin, plus a small central cluster.

    Tail (9,500 points at n_points = 10,000): theta ~ Exponential(scale 0.25),
    r = exp(-theta / 2) (1 + 2 sin theta), centre (r cos theta, r sin theta), then each coordinate
    moved by U(-w/2, w/2) with width w = 0.3 (1 - r) (w < 0 where r > 1: the same symmetric law with |w|).
    Centre (500 points): angle pi/3 + N(0, 0.5^2), radius 0.5 * U(0.5, 0.8), then each coordinate
    moved by N(0, 0.05^2).
    """
    n_centre = _part_size(n_points)
    n_tail = n_points - n_centre

    theta = rng.exponential(0.25, n_tail)
    r = np.exp(-0.5 * theta) * (1.0 + 2.0 * np.sin(theta))
    width = 0.3 * (1.0 - r)
    offset = width[:, None] * (rng.uniform(0.0, 1.0, (n_tail, 2)) - 0.5)
    tail = np.stack([r * np.cos(theta), r * np.sin(theta)], axis=1) + offset

    angle = np.pi / 3 + rng.normal(0.0, 0.5, n_centre)
    radius = 0.5 * rng.uniform(0.5, 0.8, n_centre)
    centre = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)
    return [tail, centre + rng.normal(0.0, 0.05, (n_centre, 2))]


def _parts_moons(n_points: int, rng: np.random.Generator, noise: float = 0.1) -> list[np.ndarray]:
    """Both crescents of sklearn ``make_moons(n_points, noise=0.1)``."""
    return [make_moons(n_samples=n_points, noise=noise, random_state=_sklearn_seed(rng))[0]]


def _parts_circles(n_points: int, rng: np.random.Generator, noise: float = 0.05) -> list[np.ndarray]:
    """Two concentric rings, sklearn ``make_circles(n_points, noise=0.05, factor=0.5)``."""
    return [make_circles(n_samples=n_points, noise=noise, factor=0.5, random_state=_sklearn_seed(rng))[0]]


def _parts_gaussians8(n_points: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Eight unit-variance Gaussians with means on a circle of radius 8 at angles k pi/4, k = 0..7.

    Points are split as evenly as possible: mode k gets ``n_points // 8 + (k < n_points % 8)``.
    """
    counts = [n_points // 8 + (k < n_points % 8) for k in range(8)]
    mode = np.repeat(np.arange(8), counts)
    angle = mode * (np.pi / 4)
    means = 8.0 * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    return [means + rng.standard_normal((n_points, 2))]


_PARTS: dict[str, Callable[[int, np.random.Generator], list[np.ndarray]]] = {
    "swiss_roll": _parts_swiss_roll,
    "moon_scatter": _parts_moon_scatter,
    "moon_circles": _parts_moon_circles,
    "central_banana": _parts_central_banana,
    "moons": _parts_moons,
    "circles": _parts_circles,
    "gaussians8": _parts_gaussians8,
}


def make_dataset(name: str, n_points: int = DEFAULT_N_POINTS, seed: int = 0, noise: float | None = None
                 ) -> torch.Tensor:
    """The dataset ``name`` of :data:`DATASETS`: a (n_points, 2) float32 tensor in [-1, 1].

    Its parts (see ``_parts_<name>``) drawn from ``numpy.random.default_rng(seed)``, then shuffled and
    scaled to the unit square by `_to_unit_square` with the same generator. ``noise``: the data noise of
    the sklearn generator a dataset is made from (None: its default, :data:`DATA_NOISE`; only the
    datasets named there have one).

    Raises:
        ValueError: unknown ``name`` (the message lists the valid ones), bad ``n_points``/``seed``, or a
            ``noise`` that is not a finite float >= 0 or is given for a dataset without one.
    """
    try:
        parts = _PARTS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown dataset name {name!r}; valid names: {', '.join(_PARTS)}") from None
    _check_args(n_points, seed)
    kwargs = {}
    if noise is not None:
        if name not in DATA_NOISE:
            raise ValueError(f"noise: dataset {name!r} has no data-noise parameter (datasets with one: "
                             f"{', '.join(DATA_NOISE)})")
        if isinstance(noise, bool) or not isinstance(noise, (int, float, np.floating)) or not 0 <= noise < np.inf:
            raise ValueError(f"noise must be a finite float >= 0, got {noise!r}")
        kwargs["noise"] = float(noise)
    rng = np.random.default_rng(seed)
    return _to_unit_square(parts(n_points, rng, **kwargs), rng)


# The default data noise of the datasets that have one (the ``noise`` of the sklearn generator they use).
DATA_NOISE = {"swiss_roll": 0.5, "moon_scatter": 0.1, "moon_circles": 0.1, "moons": 0.1, "circles": 0.05}

# name -> gen(n_points=10_000, seed=0): the datasets by name, each `make_dataset` with its name bound.
DATASETS: dict[str, Callable[..., torch.Tensor]] = {name: functools.partial(make_dataset, name) for name in _PARTS}
