"""Tests of the forward-process isotropy curve (isofast.metrics.isotropy)."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from isofast.data import make_dataset
from isofast.metrics.isotropy import forward_isotropy_curve, plot_isotropy_curve


def _linear_sched(T=1000, beta_start=1e-4, beta_end=0.02):
    """Stand-in schedule: only ``alphas_cumprod`` is needed."""
    betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    return SimpleNamespace(alphas_cumprod=torch.cumprod(1.0 - betas, 0).float())


@pytest.mark.parametrize("name", ["moon_scatter", "central_banana"])
def test_measured_follows_theory_on_2d_data(name):
    x0 = make_dataset(name, n_points=10_000, seed=0)
    sched = _linear_sched()
    g = torch.Generator().manual_seed(1)
    measured, theory = forward_isotropy_curve(x0, sched, generator=g)
    assert measured.shape == theory.shape == (1000,)
    assert measured.dtype == theory.dtype == np.float64
    # Per-timestep standard error is at most sqrt(2 / (n B)) = 0.01 for pure noise (n = 2, B = 10^4);
    # 5 standard errors bound every one of the 1000 points.
    assert np.abs(measured - theory).max() < 0.05
    # The errors are independent across t and centred: their mean is ~0.01 / sqrt(1000).
    assert abs((measured - theory).mean()) < 2e-3
    # The curve really moves: from the data's isotropy (well below 1 for [-1, 1] data) up to ~1.
    iso0 = (x0.double() ** 2).sum(1).mean().item() / 2
    assert iso0 < 0.6
    assert theory[0] == pytest.approx(1 + (iso0 - 1) * sched.alphas_cumprod[0].item(), abs=1e-12)
    assert abs(theory[-1] - 1.0) < 1e-3 and abs(measured[0] - iso0) < 0.01


def test_theory_is_per_element_units_with_large_isotropy():
    # x0 = 3 everywhere: iso_0 = 9, so the theory is 1 + 8 ab_t (not n + 8 ab_t, not 9 ab_t).
    x0 = torch.full((4000, 3, 2, 2), 3.0)
    sched = _linear_sched(T=50, beta_end=0.2)
    ab = sched.alphas_cumprod.double().numpy()
    measured, theory = forward_isotropy_curve(x0, sched, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(theory, 1.0 + 8.0 * ab, rtol=0, atol=1e-6)
    # Per sample |x_t|^2/n = 9 ab + 6 sqrt(ab(1-ab)) mean(eps) + (1-ab) mean(eps^2): se < 0.05 here.
    assert np.abs(measured - theory).max() < 0.1


def test_matches_the_literal_forward_process():
    x0 = torch.randn(64, 5) * 2 + 0.5
    sched = _linear_sched(T=20, beta_end=0.3)
    ts = [0, 3, 19, 3]
    measured, theory = forward_isotropy_curve(x0, sched, timesteps=ts, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    ab = sched.alphas_cumprod.double()
    x = x0.double()
    for i, t in enumerate(ts):
        eps = torch.randn(x.shape, generator=g, dtype=torch.float64)
        x_t = ab[t].sqrt() * x + (1 - ab[t]).sqrt() * eps
        assert measured[i] == pytest.approx(x_t.pow(2).mean().item(), rel=1e-12)
        assert theory[i] == pytest.approx(1 + (x.pow(2).mean().item() - 1) * ab[t].item(), rel=1e-12)


def test_with_the_real_noise_schedule():
    from isofast import NoiseSchedule, isotropy
    from isofast.reference import forward_isotropy_theory

    sched = NoiseSchedule.cosine(T=100)
    x0 = make_dataset("swiss_roll", n_points=4000, seed=2)
    ts = torch.arange(0, 100, 9)
    measured, theory = forward_isotropy_curve(x0, sched, timesteps=ts, generator=torch.Generator().manual_seed(3))
    expected = forward_isotropy_theory((x0.double() ** 2).sum(1).mean(), 2, sched.alphas_cumprod.double()[ts]) / 2
    np.testing.assert_allclose(theory, expected.numpy(), rtol=0, atol=1e-6)
    assert theory[0] == pytest.approx(isotropy(x0).item(), abs=1e-3)
    assert np.abs(measured - theory).max() < 5 * math.sqrt(2 / (2 * 4000)) + 0.02


def test_deterministic_with_generator():
    x0 = torch.randn(100, 2)
    sched = _linear_sched(T=10)
    a = forward_isotropy_curve(x0, sched, generator=torch.Generator().manual_seed(5))
    b = forward_isotropy_curve(x0, sched, generator=torch.Generator().manual_seed(5))
    c = forward_isotropy_curve(x0, sched, generator=torch.Generator().manual_seed(6))
    assert np.array_equal(a[0], b[0]) and not np.array_equal(a[0], c[0])
    assert np.array_equal(a[1], c[1])


def test_bad_inputs():
    sched = _linear_sched(T=10)
    with pytest.raises(TypeError, match="alphas_cumprod"):
        forward_isotropy_curve(torch.zeros(4, 2), object())
    with pytest.raises(ValueError, match="timesteps"):
        forward_isotropy_curve(torch.zeros(4, 2), sched, timesteps=[0, 10])
    with pytest.raises(ValueError, match="timesteps"):
        forward_isotropy_curve(torch.zeros(4, 2), sched, timesteps=[-1])
    with pytest.raises(TypeError, match="timesteps"):
        forward_isotropy_curve(torch.zeros(4, 2), sched, timesteps=[0.5])
    with pytest.raises(ValueError, match="x0"):
        forward_isotropy_curve(torch.zeros(4), sched)
    with pytest.raises(ValueError, match="x0"):
        forward_isotropy_curve(torch.tensor([[0.0, float("nan")]]), sched)
    with pytest.raises(TypeError, match="x0"):
        forward_isotropy_curve(torch.zeros(4, 2, dtype=torch.int64), sched)
    with pytest.raises(ValueError, match="alphas_cumprod"):
        forward_isotropy_curve(torch.zeros(4, 2), SimpleNamespace(alphas_cumprod=torch.tensor([1.0, 0.0])))


def test_plot_writes_a_png(tmp_path):
    x0 = make_dataset("moons", n_points=500, seed=0)
    sched = _linear_sched(T=100)
    ts = np.arange(100)
    measured, theory = forward_isotropy_curve(x0, sched, generator=torch.Generator().manual_seed(0))
    path = plot_isotropy_curve(measured, theory, ts, tmp_path / "iso.png", "moons, linear schedule")
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_plot_rejects_mismatched_lengths(tmp_path):
    with pytest.raises(ValueError, match="length"):
        plot_isotropy_curve([1.0, 2.0], [1.0], [0, 1], tmp_path / "x.png", "t")
    with pytest.raises(ValueError, match="measured"):
        plot_isotropy_curve(np.zeros((2, 2)), [1.0, 1.0], [0, 1], tmp_path / "x.png", "t")
