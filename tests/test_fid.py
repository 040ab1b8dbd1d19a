"""Tests of isofast.metrics.fid and isofast.metrics.inception.

pytorch-fid is the oracle (a test-only dependency): its Fréchet distance, and its FID Inception network built
with the same random weights (its weight download is replaced by our random state dict)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import pytorch_fid.inception
import torch
from pytorch_fid.fid_score import calculate_frechet_distance
from scipy.special import logsumexp

from isofast.metrics.fid import (
    extract_features,
    feature_statistics,
    fid_from_features,
    frechet_distance,
    inception_score,
)
from isofast.metrics.inception import (
    FID_WEIGHTS_URL,
    INCEPTION_WEIGHTS_ENV,
    FIDInceptionV3,
    load_inception,
)

# ---------------------------------------------------------------- Fréchet distance


@pytest.mark.parametrize("n,d,seed", [(300, 24, 0), (57, 9, 1), (20, 40, 2)])  # the last: singular covariances
def test_frechet_distance_matches_pytorch_fid(n, d, seed):
    rng = np.random.default_rng(seed)
    f1 = rng.normal(size=(n, d))
    f2 = rng.normal(size=(n + 7, d)) @ rng.normal(size=(d, d)) * 0.5 + rng.normal(size=d)
    mu1, s1 = feature_statistics(f1)
    mu2, s2 = feature_statistics(f2)
    np.testing.assert_allclose(mu1, f1.mean(0))
    np.testing.assert_allclose(s1, np.cov(f1, rowvar=False))
    ours = frechet_distance(mu1, s1, mu2, s2)
    with np.errstate(all="ignore"):
        ref = calculate_frechet_distance(mu1, s1, mu2, s2)
    assert abs(ours - ref) <= 1e-6 * max(1.0, abs(ref)), (ours, ref)


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(3)
    d = 11
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    v1, v2 = rng.uniform(0.1, 3.0, size=d), rng.uniform(0.1, 3.0, size=d)
    # For commuting covariances: ||mu1-mu2||^2 + sum (sqrt(v1) - sqrt(v2))^2.
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    got = frechet_distance(torch.tensor(mu1), torch.tensor(np.diag(v1)), mu2, np.diag(v2))
    assert math.isclose(got, expected, rel_tol=1e-10)
    assert abs(frechet_distance(mu1, np.diag(v1), mu1, np.diag(v1))) < 1e-10


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="mu1 and mu2"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="sigma2"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))


def test_fid_from_features_refuses_small_sets_and_agrees_with_statistics():
    rng = np.random.default_rng(4)
    f1, f2 = rng.normal(size=(100, 8)), rng.normal(loc=0.3, size=(120, 8))
    with pytest.raises(ValueError, match="features1 has 100 samples"):
        fid_from_features(f1, f2)
    with pytest.raises(ValueError, match="features1 has 110 samples"):
        fid_from_features(f2[:110], f2, min_samples=115)
    got = fid_from_features(f1, torch.from_numpy(f2), min_samples=100)
    ref = calculate_frechet_distance(f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False))
    assert abs(got - ref) <= 1e-6 * max(1.0, ref)


# ---------------------------------------------------------------- Inception Score


def _is_numpy(logits: np.ndarray, splits: int, order: np.ndarray) -> tuple[float, float]:
    """IS written independently: p = exp(l - logsumexp(l)); per chunk exp(mean_x sum_y p log(p / p_y))."""
    logits = logits[order]
    p = np.exp(logits - logsumexp(logits, axis=1, keepdims=True))
    n = len(p)
    scores = []
    for k in range(splits):
        part = p[k * n // splits:(k + 1) * n // splits]
        py = part.mean(axis=0)
        scores.append(np.exp(np.mean(np.sum(part * np.log(part / py), axis=1))))
    return float(np.mean(scores)), float(np.std(scores))


@pytest.mark.parametrize("n,c,splits", [(103, 1008, 10), (40, 17, 3), (9, 1008, 1)])
def test_inception_score_matches_its_formula(n, c, splits):
    rng = np.random.default_rng(n)
    logits = rng.normal(scale=3.0, size=(n, c)).astype(np.float32)
    mean, std = inception_score(logits, splits=splits, shuffle=False)
    ref_mean, ref_std = _is_numpy(logits.astype(np.float64), splits, np.arange(n))
    assert math.isclose(mean, ref_mean, rel_tol=1e-10) and math.isclose(std, ref_std, rel_tol=1e-8, abs_tol=1e-12)
    mean_s, std_s = inception_score(torch.from_numpy(logits), splits=splits, shuffle=True, seed=2020)
    ref_s = _is_numpy(logits.astype(np.float64), splits, np.random.RandomState(2020).permutation(n))
    assert math.isclose(mean_s, ref_s[0], rel_tol=1e-10) and math.isclose(std_s, ref_s[1], rel_tol=1e-8,
                                                                           abs_tol=1e-12)


def test_inception_score_extremes():
    # Identical predictions carry no information: IS = 1. Confident, all-different predictions: IS = chunk size.
    assert math.isclose(inception_score(np.zeros((20, 1008)), splits=2)[0], 1.0, rel_tol=1e-12)
    confident = np.full((20, 1008), -1e3)
    confident[np.arange(20), np.arange(20)] = 1e3
    mean, std = inception_score(confident, splits=2, shuffle=False)
    assert math.isclose(mean, 10.0, rel_tol=1e-9) and std < 1e-9
    with pytest.raises(ValueError, match="splits"):
        inception_score(np.zeros((5, 10)), splits=10)


# ---------------------------------------------------------------- the Inception network


def _random_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with the scale of a trained network (activations neither vanish nor explode)."""
    g = torch.Generator().manual_seed(seed)
    state = FIDInceptionV3().state_dict()
    out = {}
    for k, v in state.items():
        if k.endswith("num_batches_tracked"):
            out[k] = v
        elif k.endswith("conv.weight"):
            out[k] = torch.randn(v.shape, generator=g) * math.sqrt(2.0 / v[0].numel())
        elif k.endswith("running_var"):
            out[k] = torch.rand(v.shape, generator=g) + 0.5
        elif k.endswith("bn.weight"):
            out[k] = torch.rand(v.shape, generator=g) * 0.5 + 0.75
        else:  # bn.bias, running_mean, fc.weight, fc.bias
            out[k] = torch.randn(v.shape, generator=g) * 0.1
    return out


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    state = _random_state_dict()
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(state, path)
    return path, state


def test_key_names_equal_pytorch_fids_fid_inception_v3(weights_file, monkeypatch):
    _, state = weights_file
    # pytorch-fid would download the real weights; hand it our random ones (its load is strict).
    monkeypatch.setattr(pytorch_fid.inception, "load_state_dict_from_url", lambda *a, **k: state)
    ref = pytorch_fid.inception.fid_inception_v3()
    assert set(ref.state_dict()) == set(FIDInceptionV3().state_dict())
    for k, v in ref.state_dict().items():
        assert v.shape == state[k].shape, k


def test_network_matches_pytorch_fid_with_the_same_weights(weights_file, monkeypatch):
    path, state = weights_file
    monkeypatch.setattr(pytorch_fid.inception, "load_state_dict_from_url", lambda *a, **k: state)
    ref_net = pytorch_fid.inception.InceptionV3([3]).eval()
    ours01 = load_inception(path, input_range="[0,1]")
    ours = load_inception(path)  # [-1, 1]
    torch.manual_seed(5)
    images01 = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = ref_net(images01)[0].flatten(1)
        pool, logits = ours01(images01)
    assert pool.shape == (2, 2048) and logits.shape == (2, 1008)
    assert ref.std(0).mean() > 1e-2 * ref.abs().mean()  # the random weights give non-degenerate features
    torch.testing.assert_close(pool, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
    # [-1, 1] input gives the same network input as [0, 1] input (everything after preprocess is shared).
    torch.testing.assert_close(ours.preprocess(images01 * 2 - 1), ours01.preprocess(images01), atol=1e-6, rtol=0)
    u8 = (images01 * 255).round().to(torch.uint8)
    torch.testing.assert_close(ours.preprocess(u8), ours01.preprocess(u8.float() / 255), atol=1e-6, rtol=0)
    torch.testing.assert_close(logits, pool @ state["fc.weight"].T)  # bias-free logits


def test_load_inception_from_env_var_and_grayscale_input(weights_file, monkeypatch):
    path, _ = weights_file
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(path))
    net = load_inception()
    assert not any(p.requires_grad for p in net.parameters()) and not net.training
    gray = torch.rand(2, 1, 16, 16) * 2 - 1
    x = net.preprocess(gray)
    assert x.shape == (2, 3, 299, 299)
    torch.testing.assert_close(x, net.preprocess(gray.expand(-1, 3, -1, -1)), rtol=0, atol=0)
    with pytest.raises(ValueError, match="images must have shape"):
        net(torch.zeros(2, 2, 8, 8))


def test_missing_weights_say_where_to_get_them(tmp_path, monkeypatch):
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    with pytest.raises(FileNotFoundError) as info:
        load_inception()
    assert FID_WEIGHTS_URL in str(info.value) and INCEPTION_WEIGHTS_ENV in str(info.value)
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth"):
        load_inception(tmp_path / "nope.pth")


def test_wrong_weights_file_is_refused(tmp_path, weights_file):
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, bad)
    with pytest.raises(ValueError, match="missing keys"):
        load_inception(bad)
    with pytest.raises(ValueError, match="sha256"):
        load_inception(weights_file[0], check_hash=True)
    with pytest.raises(ValueError, match="input_range"):
        FIDInceptionV3(input_range="0..255")


# ---------------------------------------------------------------- feature extraction


class _StubInception(torch.nn.Module):
    """Stands in for the Inception net: pool = per-image statistics, logits = a fixed projection."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.seen = getattr(self, "seen", []) + [x.shape[0]]
        pool = torch.stack([x.mean((1, 2, 3)), x.std((1, 2, 3))], dim=1)
        return pool, pool @ torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]])


def test_extract_features_handles_tensors_batches_single_images_and_pairs():
    torch.manual_seed(6)
    images = torch.randn(7, 3, 4, 4)
    stub = _StubInception()
    pool, logits = extract_features(images, stub, batch_size=3, progress=False)
    assert stub.seen == [3, 3, 1]
    assert pool.shape == (7, 2) and logits.shape == (7, 3) and pool.dtype == np.float32
    expected = torch.stack([images.mean((1, 2, 3)), images.std((1, 2, 3))], 1).numpy()
    np.testing.assert_allclose(pool, expected, rtol=1e-6)
    for source in (list(images), [images[:5], images[5:]], [(images[:4], 0), (images[4:], 1)],
                   torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images), batch_size=2)):
        p2, l2 = extract_features(source, _StubInception(), batch_size=3, progress=False)
        np.testing.assert_array_equal(p2, pool)
        np.testing.assert_array_equal(l2, logits)
    with pytest.raises(ValueError, match="empty"):
        extract_features([], stub, progress=False)
    with pytest.raises(TypeError):
        extract_features([np.zeros((3, 4, 4))], stub, progress=False)
