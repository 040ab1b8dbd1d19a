"""The public API: argument checks (every backend shares them), NaN semantics, keys and backend choice."""
import pytest
import torch

import isofast
from isofast import NoiseKey, NoiseSchedule, ddim_step, ddpm_step, iso_ddpm_loss, q_sample
from isofast.ops import backends

S = NoiseSchedule.linear(T=100)


def test_public_names():
    for name in ("iso_ddpm_loss", "q_sample", "NoiseSchedule", "NoiseKey", "ddpm_step", "ddim_step", "isotropy"):
        assert hasattr(isofast, name)


def test_q_sample_returns_key_whose_noise_was_used():
    x0 = torch.randn(3, 2, 5, dtype=torch.float64)  # float64: recovering eps divides by sqrt(1 - ab_0) = 0.01
    t = torch.tensor([0, 50, 99])
    x_t, key = q_sample(x0, t, S, backend="reference")
    assert isinstance(key, NoiseKey) and key.shape == x0.shape
    # float64 data is noised with the schedule's exact (float64 master) coefficients
    a = S.exact("sqrt_alphas_cumprod")[t].reshape(3, 1, 1)
    b = S.exact("sqrt_one_minus_alphas_cumprod")[t].reshape(3, 1, 1)
    torch.testing.assert_close((x_t - a * x0) / b, key.materialize().double(), rtol=1e-9, atol=1e-9)


def test_manual_seed_makes_keys_repeatable():
    x0, t = torch.randn(2, 4), torch.tensor([1, 2])
    torch.manual_seed(5)
    a = q_sample(x0, t, S)
    torch.manual_seed(5)
    b = q_sample(x0, t, S)
    assert a[1] == b[1] and torch.equal(a[0], b[0])


def test_explicit_noise_tensor_and_int_timestep():
    x0, eps = torch.randn(2, 3), torch.randn(2, 3)
    x_t, noise = q_sample(x0, 10, S, eps)
    assert noise is eps
    ab = S.alphas_cumprod[10]
    torch.testing.assert_close(x_t, ab.sqrt() * x0 + (1 - ab).sqrt() * eps)


def test_loss_with_key_equals_loss_with_materialized_noise():
    p = torch.randn(3, 7, requires_grad=True)
    key = NoiseKey(11, 2**33, (3, 7))
    a = iso_ddpm_loss(p, key, 0.2, "sample")
    b = iso_ddpm_loss(p, key.materialize(), 0.2, "sample")
    torch.testing.assert_close(a, b)


def test_return_parts():
    p = torch.randn(4, 5)
    loss, parts = iso_ddpm_loss(p, torch.zeros_like(p), 0.5, return_parts=True)
    torch.testing.assert_close(parts.isotropy, (p**2).mean())
    torch.testing.assert_close(loss, parts.mse + 0.5 * parts.iso)


def test_nan_in_prediction_gives_nan_loss():
    p = torch.randn(2, 4)
    p[0, 1] = float("nan")
    assert torch.isnan(iso_ddpm_loss(p, torch.zeros_like(p)))


def test_isotropy_public():
    assert isofast.isotropy(torch.ones(3, 4) * 2).item() == pytest.approx(4.0)


# ----- bad input -------------------------------------------------------------------------------
P = torch.randn(2, 3)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(eps_pred=torch.randn(2, 4)), ValueError, "shape"),
        (dict(eps_pred=torch.ones(2, 3, dtype=torch.int64)), TypeError, "eps_pred.*floating"),
        (dict(noise=torch.ones(2, 3, dtype=torch.int32)), TypeError, "noise.*floating"),
        (dict(noise=[1.0, 2.0]), TypeError, "noise must be a NoiseKey or a torch.Tensor"),
        (dict(noise=NoiseKey(0, 0, (3, 2))), ValueError, "noise .NoiseKey. must have the shape"),
        (dict(iso_lambda=-0.1), ValueError, "iso_lambda"),
        (dict(iso_lambda=float("nan")), ValueError, "iso_lambda"),
        (dict(iso_lambda=float("inf")), ValueError, "iso_lambda"),
        (dict(iso_lambda="0.3"), TypeError, "iso_lambda"),
        (dict(iso_mode="global"), ValueError, "iso_mode"),
        (dict(reduction="max"), ValueError, "reduction"),
        (dict(reduction="none"), ValueError, 'reduction="none" needs iso_mode="sample"'),
        (dict(eps_pred=torch.randn(0, 3), noise=torch.randn(0, 3)), ValueError, "non-empty batch"),
        (dict(eps_pred=torch.randn(2, 0), noise=torch.randn(2, 0)), ValueError, "at least one element"),
        (dict(weights=torch.ones(3)), ValueError, "weights must have shape"),
        (dict(weights=torch.ones(2, dtype=torch.int64)), TypeError, "weights"),
        (dict(backend="tpu"), ValueError, "backend must be one of"),
    ],
)
def test_loss_bad_input(kwargs, exc, match):
    args = dict(eps_pred=P, noise=torch.zeros(2, 3))
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        iso_ddpm_loss(**args)


def test_loss_on_different_devices_is_refused():
    key = NoiseKey(0, 0, (2, 3), device=torch.device("meta"))
    with pytest.raises(ValueError, match="same device"):
        iso_ddpm_loss(P, key)


@pytest.mark.parametrize(
    "t,exc,match",
    [
        (torch.tensor([0, 100]), ValueError, r"t must be in \[0, 100\)"),
        (torch.tensor([-1, 3]), ValueError, r"t must be in \[0, 100\)"),
        (100, ValueError, r"t must be in \[0, 100\)"),
        (torch.tensor([0.5, 1.0]), TypeError, "integer dtype"),
        (torch.tensor([1, 2, 3]), ValueError, r"shape \(2,\)"),
        (1.5, TypeError, "t must be an int"),
    ],
)
def test_q_sample_bad_timesteps(t, exc, match):
    with pytest.raises(exc, match=match):
        q_sample(P, t, S)


def test_q_sample_bad_schedule_and_data():
    with pytest.raises(TypeError, match="sched must be a NoiseSchedule"):
        q_sample(P, 0, "linear")
    with pytest.raises(TypeError, match="x0"):
        q_sample(P.long(), 0, S)


def test_steps_bad_input():
    with pytest.raises(ValueError, match="eps_pred must have the shape"):
        ddpm_step(P, torch.randn(2, 4), 5, S)
    with pytest.raises(ValueError, match="variance"):
        ddpm_step(P, P, 5, S, variance="learned")
    with pytest.raises(ValueError, match="eta"):
        ddim_step(P, P, 5, 4, S, eta=-1.0)
    with pytest.raises(ValueError, match=r"t_prev must be in \[-1, 100\)"):
        ddim_step(P, P, 5, -2, S)


def test_named_unavailable_backend_raises_not_falls_back(monkeypatch):
    monkeypatch.setattr(backends, "status", lambda name: (name == "reference", "not built in this test"))
    with pytest.raises(RuntimeError, match="backend 'cpu' is not available: not built in this test"):
        iso_ddpm_loss(P, torch.zeros(2, 3), backend="cpu")


def test_env_var_overrides_auto(monkeypatch):
    monkeypatch.setenv("ISOFAST_BACKEND", "reference")
    assert backends.resolve(None, torch.device("cpu")) == "reference"
    monkeypatch.setenv("ISOFAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="backend must be one of"):
        iso_ddpm_loss(P, torch.zeros(2, 3))


def test_steps_with_generator_are_repeatable():
    x, e = torch.randn(2, 3), torch.randn(2, 3)
    a = ddpm_step(x, e, 5, S, generator=torch.Generator().manual_seed(1))
    b = ddpm_step(x, e, 5, S, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
