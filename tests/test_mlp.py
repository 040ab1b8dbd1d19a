"""Tests of the time-conditioned MLP (isofast.models.mlp) and the timestep embedding."""

import math

import pytest
import torch

from isofast.models import TimeMLP, timestep_embedding


def _embedding_by_formula(t, dim, max_period=10000.0):
    half = dim // 2
    rows = []
    for tb in t.tolist():
        freqs = [max_period ** (-j / half) for j in range(half)]
        row = [math.cos(tb * f) for f in freqs] + [math.sin(tb * f) for f in freqs]
        rows.append(row + [0.0] * (dim % 2))
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("dim", [2, 7, 128])
@pytest.mark.parametrize("max_period", [10000.0, 50.0])
def test_timestep_embedding_matches_formula(dim, max_period):
    t = torch.tensor([0, 1, 17, 999], dtype=torch.int64)
    got = timestep_embedding(t, dim, max_period)
    assert got.shape == (4, dim) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _embedding_by_formula(t, dim, max_period), atol=2e-4, rtol=0)
    got64 = timestep_embedding(t.double() + 0.5, dim, max_period)
    assert got64.dtype == torch.float64
    torch.testing.assert_close(got64, _embedding_by_formula(t.double() + 0.5, dim, max_period), atol=1e-10, rtol=0)


def test_timestep_embedding_distinguishes_timesteps():
    emb = timestep_embedding(torch.arange(1000), 128)
    dists = torch.cdist(emb, emb)
    dists.fill_diagonal_(float("inf"))
    assert dists.min() > 1e-2


@pytest.mark.parametrize("bad_t, exc", [(torch.zeros(2, 3), ValueError), (torch.zeros(()), ValueError),
                                        ([1, 2], TypeError)])
def test_timestep_embedding_bad_t(bad_t, exc):
    with pytest.raises(exc, match="t"):
        timestep_embedding(bad_t, 8)


@pytest.mark.parametrize("dim", [0, 1, 3.0])
def test_timestep_embedding_bad_dim(dim):
    with pytest.raises(ValueError, match="dim"):
        timestep_embedding(torch.arange(3), dim)


def test_default_architecture_is_the_papers():
    model = TimeMLP()
    widths = [(layer.in_features, layer.out_features) for layer in model.layers] + [
        (model.out.in_features, model.out.out_features)]
    assert widths == [(2, 128), (128, 128), (128, 128), (128, 2)]
    assert all(p.in_features == 128 and p.out_features == 128 for p in model.time_proj)


@pytest.mark.parametrize("data_dim, hidden, n_layers, emb_dim, batch", [
    (2, 128, 3, 128, 5), (3, 16, 1, 7, 1), (5, 33, 4, 2, 9)])
def test_shapes(data_dim, hidden, n_layers, emb_dim, batch):
    torch.manual_seed(0)
    model = TimeMLP(data_dim=data_dim, hidden=hidden, n_layers=n_layers, emb_dim=emb_dim)
    x = torch.randn(batch, data_dim)
    out_int = model(x, torch.randint(0, 1000, (batch,)))
    out_float = model(x, torch.rand(batch) * 1000)
    assert out_int.shape == out_float.shape == (batch, data_dim)
    assert out_int.dtype == torch.float32
    assert model.double()(x.double(), torch.arange(batch)).dtype == torch.float64


def test_output_depends_on_t_and_x():
    torch.manual_seed(0)
    model = TimeMLP()
    x = torch.randn(4, 2)
    t = torch.full((4,), 10)
    base = model(x, t)
    assert not torch.allclose(base, model(x, t + 500))
    assert not torch.allclose(base, model(x + 1.0, t))
    # Rows are independent: one sample's output does not depend on the others in the batch.
    torch.testing.assert_close(model(x[:1], t[:1]), base[:1])


def test_scalar_t_is_broadcast():
    torch.manual_seed(0)
    model = TimeMLP()
    x = torch.randn(3, 2)
    torch.testing.assert_close(model(x, 7), model(x, torch.full((3,), 7)))
    torch.testing.assert_close(model(x, torch.tensor(7)), model(x, torch.full((3,), 7)))


def test_matches_manual_forward():
    torch.manual_seed(1)
    model = TimeMLP(data_dim=2, hidden=8, n_layers=2, emb_dim=6)
    x, t = torch.randn(3, 2), torch.tensor([0, 5, 900])
    emb = timestep_embedding(t, 6)
    h = x
    for layer, proj in zip(model.layers, model.time_proj, strict=True):
        h = torch.relu(h @ layer.weight.T + layer.bias + emb @ proj.weight.T)
    torch.testing.assert_close(model(x, t), h @ model.out.weight.T + model.out.bias)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = TimeMLP()
    x = torch.randn(64, 2, requires_grad=True)
    t = torch.randint(0, 1000, (64,))
    loss = (model(x, t) - torch.randn(64, 2)).pow(2).mean()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_training_reduces_loss():
    torch.manual_seed(0)
    model = TimeMLP(hidden=32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(256, 2)
    t = torch.randint(0, 1000, (256,))
    target = torch.sin(x) * (t[:, None] / 1000.0)
    first = None
    for _ in range(100):
        loss = (model(x, t) - target).pow(2).mean()
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first


@pytest.mark.parametrize("x, t", [
    (torch.zeros(4, 3), torch.zeros(4, dtype=torch.int64)),
    (torch.zeros(4), torch.zeros(4, dtype=torch.int64)),
    (torch.zeros(4, 2), torch.zeros(3, dtype=torch.int64)),
    (torch.zeros(4, 2), torch.zeros(4, 1, dtype=torch.int64)),
])
def test_bad_shapes(x, t):
    with pytest.raises(ValueError):
        TimeMLP()(x, t)


@pytest.mark.parametrize("kwargs", [{"hidden": 0}, {"n_layers": 0}, {"emb_dim": 1}, {"data_dim": 2.0}])
def test_bad_config(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        TimeMLP(**kwargs)
