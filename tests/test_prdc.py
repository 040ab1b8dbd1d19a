"""Tests of the chunked PRDC metric (isofast.metrics.prdc) against the ``prdc`` package."""

import contextlib
import importlib
import io
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from prdc import compute_prdc

from isofast.metrics.prdc import prdc

# isofast.metrics re-exports the function prdc, which shadows the submodule as an attribute.
prdc_module = importlib.import_module("isofast.metrics.prdc")

KEYS = ("precision", "recall", "density", "coverage")


def _reference(real, fake, k):
    with contextlib.redirect_stdout(io.StringIO()):  # compute_prdc prints the set sizes
        out = compute_prdc(np.asarray(real), np.asarray(fake), k)
    return {key: float(out[key]) for key in KEYS}


def _overlapping_sets(n, m, d, seed):
    """Real ~ N(0, I); fake ~ N(0.4, 1.3^2 I): partial overlap, so no metric is trivially 0 or 1."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)), 0.4 + 1.3 * rng.standard_normal((m, d))


@pytest.mark.parametrize("n, m, d, k", [
    (200, 150, 2, 5),     # the 2D case of the paper
    (101, 257, 3, 1),     # k = 1, odd sizes
    (300, 120, 32, 3),    # largest dim of the direct-distance path
    (250, 260, 64, 10),   # matmul-expansion path
])
@pytest.mark.parametrize("chunk_size", [2048, 37])
def test_matches_prdc_package(n, m, d, k, chunk_size):
    real, fake = _overlapping_sets(n, m, d, seed=n + d)
    expected = _reference(real, fake, k)
    assert 0.0 < expected["precision"] < 1.0 or 0.0 < expected["coverage"] < 1.0
    got = prdc(real, fake, k=k, chunk_size=chunk_size)
    assert set(got) == set(KEYS)
    for key in KEYS:
        assert abs(got[key] - expected[key]) <= 1e-6, (key, got[key], expected[key])


def test_torch_and_numpy_inputs_agree_and_float32_inputs_match_package():
    real, fake = _overlapping_sets(180, 190, 4, seed=3)
    real32, fake32 = real.astype(np.float32), fake.astype(np.float32)
    expected = _reference(real32, fake32, 4)
    from_numpy = prdc(real32, fake32, k=4)
    from_torch = prdc(torch.from_numpy(real32), torch.from_numpy(fake32), k=4)
    assert from_numpy == from_torch
    for key in KEYS:
        assert abs(from_numpy[key] - expected[key]) <= 1e-6


def test_duplicate_points_stay_neighbours():
    real, fake = _overlapping_sets(120, 100, 2, seed=5)
    real = np.concatenate([real, real[:30]])  # 30 points appear twice: self is excluded by position
    expected = _reference(real, fake, 5)
    got = prdc(real, fake, k=5)
    for key in KEYS:
        assert abs(got[key] - expected[key]) <= 1e-6


@pytest.mark.parametrize("d", [2, 40])
def test_chunked_equals_unchunked(d):
    real, fake = _overlapping_sets(230, 170, d, seed=d)
    whole = prdc(real, fake, k=4, chunk_size=10_000)
    for chunk_size in (16, 64, 229):
        assert prdc(real, fake, k=4, chunk_size=chunk_size) == whole
    # chunk_size 1: every block is one distance, the running top-k starts from a lone self inf.
    assert prdc(real[:20], fake[:15], k=4, chunk_size=1) == prdc(real[:20], fake[:15], k=4)


def test_float32_distances_close_to_float64():
    real, fake = _overlapping_sets(200, 200, 8, seed=9)
    a = prdc(real, fake, k=5, dtype=torch.float64)
    b = prdc(real, fake, k=5, dtype=torch.float32)
    for key in KEYS:
        assert abs(a[key] - b[key]) <= 0.01


@pytest.mark.parametrize("d, k", [(2, 5), (7, 1), (50, 3)])
def test_identical_sets(d, k):
    # Each real ball holds its own centre (distance 0 < r) so precision, recall and coverage are 1.
    # Density: a ball of radius r_i strictly holds the point itself and its k-1 nearest neighbours;
    # the k-th sits exactly on the border (distance == r_i, not counted). With distinct distances
    # that is k points per ball, so density = (1/(k M)) * N k = 1 exactly when a pair's distance is
    # computed identically in both passes, which the direct path (d <= 32) guarantees. The matmul
    # path (d > 32) may round the border point inside: density in [1, 1 + 1/k].
    rng = np.random.default_rng(d)
    x = rng.standard_normal((150, d))
    got = prdc(x, x.copy(), k=k, chunk_size=64)
    assert got["precision"] == got["recall"] == got["coverage"] == 1.0
    if d <= prdc_module._DIRECT_MAX_DIM:
        assert got["density"] == 1.0
    else:
        assert 1.0 <= got["density"] <= 1.0 + 1.0 / k


def test_disjoint_far_apart_sets_score_zero():
    rng = np.random.default_rng(0)
    real = rng.standard_normal((100, 3))
    fake = rng.standard_normal((80, 3)) + 100.0
    assert prdc(real, fake, k=5) == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_fake_inside_a_dense_real_cloud():
    # Fakes concentrated at the real mode: precision 1, density > 1, recall and coverage < 1.
    rng = np.random.default_rng(1)
    real = rng.standard_normal((400, 2))
    fake = 0.05 * rng.standard_normal((300, 2))
    got = prdc(real, fake, k=5)
    expected = _reference(real, fake, 5)
    assert got["precision"] == 1.0 and got["density"] > 1.0
    assert got["recall"] < 0.5 and got["coverage"] < 0.5
    for key in KEYS:
        assert abs(got[key] - expected[key]) <= 1e-6


def test_blocks_never_exceed_chunk_size(monkeypatch):
    shapes = []
    original = prdc_module._pairwise_distances

    def recording(a, b):
        shapes.append((a.shape[0], b.shape[0]))
        return original(a, b)

    monkeypatch.setattr(prdc_module, "_pairwise_distances", recording)
    n, m, chunk = 300, 250, 64
    real, fake = _overlapping_sets(n, m, 3, seed=0)
    prdc(real, fake, k=3, chunk_size=chunk)
    assert max(max(s) for s in shapes) <= chunk
    # The blocks tile real x real, fake x fake and real x fake exactly once each.
    assert sum(p * q for p, q in shapes) == n * n + m * m + n * m


def test_peak_memory_stays_far_below_the_full_matrix():
    # A 5000 x 5000 float64 distance matrix is 200 MB; chunks of 1024 need a few 8 MB blocks.
    script = textwrap.dedent("""
        import resource, torch
        from isofast.metrics.prdc import prdc
        g = torch.Generator().manual_seed(0)
        real, fake = torch.randn(5000, 2, generator=g), torch.randn(5000, 2, generator=g)
        prdc(real[:50], fake[:50], k=3, chunk_size=16)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        prdc(real, fake, k=5, chunk_size=1024)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=root, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    extra_mb = int(out.stdout.strip().splitlines()[-1])
    assert extra_mb < 100, f"peak memory grew by {extra_mb} MB"


@pytest.mark.parametrize("which", ["real", "fake"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_names_the_set(which, bad):
    real, fake = _overlapping_sets(20, 20, 2, seed=0)
    (real if which == "real" else fake)[7, 1] = bad
    with pytest.raises(ValueError, match=which):
        prdc(real, fake, k=3)


@pytest.mark.parametrize("which", ["real", "fake"])
def test_too_few_points_for_k(which):
    real, fake = _overlapping_sets(10, 10, 2, seed=0)
    sets = {"real": real, "fake": fake}
    sets[which] = sets[which][:5]
    with pytest.raises(ValueError, match=which):
        prdc(sets["real"], sets["fake"], k=5)
    prdc(real[:6], fake[:6], k=5)  # k + 1 points is enough


def test_bad_arguments():
    real, fake = _overlapping_sets(20, 20, 2, seed=0)
    with pytest.raises(ValueError, match="dim"):
        prdc(real, fake[:, :1], k=3)
    with pytest.raises(ValueError, match="real"):
        prdc(real[:, 0], fake, k=3)
    with pytest.raises(ValueError, match="fake"):
        prdc(real, fake[None], k=3)
    with pytest.raises(ValueError, match="k"):
        prdc(real, fake, k=0)
    with pytest.raises(ValueError, match="chunk_size"):
        prdc(real, fake, k=3, chunk_size=0)
    with pytest.raises(TypeError, match="real"):
        prdc(real.tolist(), fake, k=3)
    with pytest.raises(TypeError, match="dtype"):
        prdc(real, fake, k=3, dtype=torch.float16)
    with pytest.raises(ValueError, match="devices"):
        prdc(torch.zeros(20, 2), torch.zeros(20, 2, device="meta"), k=3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    real, fake = _overlapping_sets(500, 400, 2, seed=4)
    cpu = prdc(real, fake, k=5, chunk_size=128)
    cuda = prdc(torch.from_numpy(real).cuda(), torch.from_numpy(fake).cuda(), k=5, chunk_size=128)
    mixed = prdc(torch.from_numpy(real).cuda(), fake, k=5, chunk_size=128)
    assert cpu == cuda == mixed
    real, fake = _overlapping_sets(300, 300, 64, seed=4)
    expected = _reference(real, fake, 3)
    got = prdc(torch.from_numpy(real).cuda(), torch.from_numpy(fake).cuda(), k=3)
    for key in KEYS:
        assert abs(got[key] - expected[key]) <= 1e-6


def test_reference_scores_every_fake_set_as_prdc_with_the_real_radii_once(monkeypatch):
    """PRDCReference(real).score(fake) equals prdc(real, fake) exactly; the real set's k-NN radii are computed once."""
    from isofast.metrics import PRDCReference

    prdc_module = importlib.import_module("isofast.metrics.prdc")
    gen = torch.Generator().manual_seed(0)
    real = torch.randn(300, 2, generator=gen)
    fakes = [torch.randn(250, 2, generator=gen) * s for s in (0.5, 1.0, 2.0)]
    want = [prdc(real, f, k=4, chunk_size=64) for f in fakes]
    calls = []
    knn = prdc_module._knn_radii
    monkeypatch.setattr(prdc_module, "_knn_radii", lambda x, *a: calls.append(x.shape[0]) or knn(x, *a))
    ref = PRDCReference(real, k=4, chunk_size=64)
    assert [ref.score(f) for f in fakes] == want
    assert calls == [300, 250, 250, 250]  # the real set's radii once, each fake set's once
    assert ref.score(fakes[0].numpy()) == want[0]  # numpy fakes follow the real set's device
    with pytest.raises(ValueError, match="same dim"):
        ref.score(torch.randn(50, 3))
    with pytest.raises(ValueError, match="fake contains NaN or inf"):
        ref.score(torch.full((50, 2), float("nan")))
    with pytest.raises(ValueError, match="real needs at least k"):
        PRDCReference(real[:4], k=4)
    with pytest.raises(ValueError, match="real contains NaN or inf"):
        PRDCReference(torch.full((50, 2), float("inf")), k=4).score(fakes[0])
