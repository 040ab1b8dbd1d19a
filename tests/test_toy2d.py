"""Tests of the seeded 2D toy datasets (isofast.data.toy2d)."""

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree

from isofast.data import DATASETS, make_dataset, toy2d

NAMES = ["swiss_roll", "moon_scatter", "moon_circles", "central_banana", "moons", "circles", "gaussians8"]


def _parts(name, n_points, seed=0):
    return getattr(toy2d, f"_parts_{name}")(n_points, np.random.default_rng(seed))


def test_registry_holds_exactly_the_documented_names():
    assert sorted(DATASETS) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_default_size_dtype_and_range(name):
    x = make_dataset(name)
    assert isinstance(x, torch.Tensor)
    assert x.shape == (10_000, 2) and x.dtype == torch.float32 and x.device.type == "cpu"
    assert torch.isfinite(x).all()
    assert x.min() >= -1.0 and x.max() <= 1.0
    # Min-max scaling per column: both borders of both columns are reached.
    assert torch.equal(x.min(0).values, torch.tensor([-1.0, -1.0]))
    assert torch.equal(x.max(0).values, torch.tensor([1.0, 1.0]))


@pytest.mark.parametrize("name", NAMES)
def test_output_is_the_per_column_min_max_map_of_the_parts(name):
    n, seed = 777, 11
    raw = np.concatenate(_parts(name, n, seed))
    out = make_dataset(name, n_points=n, seed=seed).numpy().astype(np.float64)
    lo, hi = raw.min(0), raw.max(0)
    expected = 2.0 * (raw - lo) / (hi - lo) - 1.0
    # Rows are shuffled: compare each column's sorted values (the map is increasing per column).
    np.testing.assert_allclose(np.sort(out, axis=0), np.sort(expected, axis=0), rtol=0, atol=1e-7)
    # The shuffle is a permutation of whole rows: each output row is the scaled input row nearest to it,
    # and no input row is used twice.
    dist, index = cKDTree(expected).query(out)
    assert dist.max() < 1e-6
    assert len(np.unique(index)) == n


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n_points", [2, 3, 37, 1001])
def test_odd_sizes_keep_the_total(name, n_points):
    x = make_dataset(name, n_points=n_points, seed=5)
    assert x.shape == (n_points, 2)
    assert x.min() >= -1.0 and x.max() <= 1.0


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_per_seed_and_different_across_seeds(name):
    a = make_dataset(name, n_points=500, seed=3)
    b = make_dataset(name, n_points=500, seed=3)
    c = make_dataset(name, n_points=500, seed=4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(DATASETS[name](n_points=500, seed=3), a)


@pytest.mark.parametrize("name", NAMES)
def test_points_are_distinct_and_spread(name):
    x = make_dataset(name, n_points=2000, seed=1)
    assert torch.unique(x, dim=0).shape[0] > 1990
    assert x.std(0).min() > 0.2


def test_part_sizes_scale_with_n_points():
    assert toy2d._part_size(10_000) == 500
    assert toy2d._part_size(20_000) == 1000
    assert toy2d._part_size(1000) == 50
    assert toy2d._part_size(10) == 1  # 0.5 rounds up
    assert toy2d._part_size(9) == 0


@pytest.mark.parametrize("n_points", [10_000, 3001])
def test_part_sizes_of_the_paper_datasets(n_points):
    m = toy2d._part_size(n_points)
    assert [len(p) for p in _parts("moon_scatter", n_points)] == [n_points - m, m]
    assert [len(p) for p in _parts("moon_circles", n_points)] == [n_points - 2 * m, m, m]
    assert [len(p) for p in _parts("central_banana", n_points)] == [n_points - m, m]


def test_moon_scatter_geometry():
    crescent, scatter = _parts("moon_scatter", 10_000)
    # Upper crescent of make_moons: unit half-circle (y >= 0 before noise) with noise 0.1.
    dev_c = np.linalg.norm(crescent, axis=1) - 1.0
    dev_s = np.linalg.norm(scatter, axis=1) - 1.0
    assert abs(dev_c.std() - 0.1) < 0.02
    # Scatter = crescent point + 0.3 N(0, I): radial spread about sqrt(0.1^2 + 0.3^2) = 0.32.
    assert 0.25 < dev_s.std() < 0.40
    assert (crescent[:, 1] > -0.5).all()


def test_moon_circles_geometry():
    crescent, disc_left, disc_right = _parts("moon_circles", 10_000)
    for disc, centre in ((disc_left, (-1.5, -1.0)), (disc_right, (1.5, -1.0))):
        r = np.linalg.norm(disc - np.array(centre), axis=1)
        assert r.min() >= 0.01 - 1e-12 and r.max() <= 0.25 + 1e-12
        # Uniform in area: E[r^2] = (0.01^2 + 0.25^2) / 2.
        assert abs((r**2).mean() - (0.01**2 + 0.25**2) / 2) < 0.003
    assert (crescent[:, 1] > -0.6).all()


def test_central_banana_geometry():
    tail, centre = _parts("central_banana", 10_000)
    angle = np.arctan2(centre[:, 1], centre[:, 0])
    assert abs(angle.mean() - np.pi / 3) < 0.1
    radius = np.linalg.norm(centre, axis=1)
    assert 0.25 < radius.mean() < 0.4  # 0.5 * U(0.5, 0.8) has mean 0.325
    # The tail starts near (1, 0) (theta ~ 0, r ~ 1) and theta ~ Exp(0.25) keeps most points near it.
    tail_r = np.linalg.norm(tail, axis=1)
    assert np.median(np.arctan2(tail[:, 1], tail[:, 0])) < 0.3
    assert 0.9 < np.median(tail_r) < 1.6


def test_gaussians8_modes():
    (x,) = _parts("gaussians8", 8003)
    angle = np.mod(np.arctan2(x[:, 1], x[:, 0]), 2 * np.pi)
    mode = np.round(angle / (np.pi / 4)).astype(int) % 8
    counts = np.bincount(mode, minlength=8)
    assert counts.sum() == 8003
    assert np.abs(counts - 1000).max() < 40
    assert abs(np.linalg.norm(x, axis=1).mean() - 8.0) < 0.2


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        make_dataset("spiral")
    message = str(err.value)
    assert "spiral" in message
    for name in NAMES:
        assert name in message


@pytest.mark.parametrize("bad", [0, 1, -5, 2.5, True])
def test_bad_n_points(bad):
    with pytest.raises(ValueError, match="n_points"):
        make_dataset("moons", n_points=bad)


@pytest.mark.parametrize("bad", [-1, 1.5])
def test_bad_seed(bad):
    with pytest.raises(ValueError, match="seed"):
        make_dataset("moons", seed=bad)
