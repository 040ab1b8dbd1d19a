"""NoiseSchedule: closed forms and the diffusers schedules as an external oracle."""
import math

import pytest
import torch

from isofast import NoiseSchedule


def test_linear_closed_form():
    s = NoiseSchedule.linear(T=10, dtype=torch.float64)
    betas = torch.tensor([1e-4 + (0.02 - 1e-4) * i / 9 for i in range(10)], dtype=torch.float64)
    torch.testing.assert_close(s.betas, betas, rtol=0, atol=1e-15)
    ab = [math.prod(1 - b for b in betas[: i + 1].tolist()) for i in range(10)]
    torch.testing.assert_close(s.alphas_cumprod, torch.tensor(ab, dtype=torch.float64), rtol=1e-14, atol=0)
    assert s.alphas_cumprod_prev[0] == 1 and torch.equal(s.alphas_cumprod_prev[1:], s.alphas_cumprod[:-1])


def test_derived_tables_closed_form():
    s = NoiseSchedule.cosine(T=50, dtype=torch.float64)
    ab, ab_prev, b = s.alphas_cumprod, s.alphas_cumprod_prev, s.betas
    close = lambda a, e: torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-14)  # noqa: E731
    close(s.sqrt_alphas_cumprod**2, ab)
    close(s.sqrt_one_minus_alphas_cumprod**2, 1 - ab)
    close(s.sqrt_recip_alphas_cumprod * s.sqrt_alphas_cumprod, torch.ones_like(ab))
    close(s.sqrt_recipm1_alphas_cumprod**2, (1 - ab) / ab)
    close(s.posterior_variance, b * (1 - ab_prev) / (1 - ab))
    assert s.posterior_variance[0] == 0
    close(s.posterior_log_variance_clipped[1:], torch.log(s.posterior_variance[1:]))
    assert s.posterior_log_variance_clipped[0] == s.posterior_log_variance_clipped[1]
    close(s.posterior_mean_coef1, b * ab_prev.sqrt() / (1 - ab))
    close(s.posterior_mean_coef2, (1 - ab_prev) * (1 - b).sqrt() / (1 - ab))
    # the posterior mean coefficients reproduce x0 and x_t exactly when x_t is the noiseless forward sample
    close(s.posterior_mean_coef1 + s.posterior_mean_coef2 * s.sqrt_alphas_cumprod, ab_prev.sqrt())


def test_cosine_closed_form_and_clip():
    T, s_ = 1000, 0.008
    sched = NoiseSchedule.cosine(T, dtype=torch.float64)
    f = lambda t: math.cos((t / T + s_) / (1 + s_) * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 1, 500, 998):
        assert sched.betas[t].item() == pytest.approx(min(1 - f(t + 1) / f(t), 0.999), rel=1e-12)
    assert sched.betas.max().item() == pytest.approx(0.999)  # the last beta hits the clip


def test_scaled_linear_closed_form():
    s = NoiseSchedule.scaled_linear(T=5, dtype=torch.float64)
    assert s.betas[0].item() == pytest.approx(0.00085, rel=1e-12)
    assert s.betas[-1].item() == pytest.approx(0.012, rel=1e-12)
    torch.testing.assert_close(s.betas.sqrt().diff(), torch.full((4,), (0.012**0.5 - 0.00085**0.5) / 4, dtype=torch.float64))


@pytest.mark.parametrize("kind,name", [("linear", "linear"), ("cosine", "squaredcos_cap_v2"), ("scaled_linear", "scaled_linear")])
def test_betas_equal_diffusers(kind, name):
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=name, **({"beta_start": 0.00085, "beta_end": 0.012} if kind == "scaled_linear" else {}))
    ours = getattr(NoiseSchedule, kind)(1000)
    torch.testing.assert_close(ours.betas, ref.betas.float(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod.float(), rtol=1e-5, atol=1e-7)


def test_tables_built_in_float64_then_cast():
    s32, s64 = NoiseSchedule.linear(dtype=torch.float32), NoiseSchedule.linear(dtype=torch.float64)
    assert torch.equal(s32.alphas_cumprod, s64.alphas_cumprod.float())


def test_to_moves_and_casts():
    s = NoiseSchedule.linear(T=8)
    d = s.to(dtype=torch.float64)
    assert d.dtype == torch.float64 and d.T == 8 and d.betas.device == s.device
    assert s.dtype == torch.float32  # the original is untouched


@pytest.mark.parametrize("T", [0, -3, 2.5, True])
def test_bad_T(T):
    with pytest.raises(ValueError, match="T must be"):
        NoiseSchedule.linear(T)


def test_bad_betas():
    with pytest.raises(ValueError, match="betas"):
        NoiseSchedule.from_betas(torch.tensor([0.1, 1.5]))
    with pytest.raises(ValueError, match="variance"):
        NoiseSchedule.linear(4).posterior_std("learned")


def test_float64_copy_of_a_float32_schedule_holds_exact_values():
    s32 = NoiseSchedule.cosine(T=100)
    s64 = NoiseSchedule.cosine(T=100, dtype=torch.float64)
    promoted = s32.to(dtype=torch.float64)
    for name in ("betas", "alphas_cumprod", "posterior_variance", "sqrt_recipm1_alphas_cumprod"):
        assert torch.equal(getattr(promoted, name), getattr(s64, name)), name
    assert torch.equal(promoted.to(dtype=torch.float32).alphas_cumprod, s32.alphas_cumprod)


@pytest.mark.parametrize("name", ["linear", "cosine", "scaled_linear"])
def test_from_name_is_the_named_constructor(name):
    s = NoiseSchedule.from_name(name, 20)
    assert s.name == name and s.T == 20 and s.dtype == torch.float32
    assert torch.equal(s.betas, getattr(NoiseSchedule, name)(T=20).betas)


def test_from_name_lists_the_names_of_an_unknown_one():
    with pytest.raises(ValueError, match=r"schedule must be one of \('linear', 'cosine', 'scaled_linear'\), got 'quadratic'"):
        NoiseSchedule.from_name("quadratic", 10)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64, torch.complex128, "float32"])
def test_non_real_float_dtype_is_refused(dtype):
    """int64 rounded every beta to 0 (ab = 1, a schedule that adds no noise); complex was meaningless (issue 14)."""
    with pytest.raises(TypeError, match="dtype must be a real floating torch.dtype"):
        NoiseSchedule.linear(10, dtype=dtype)
    with pytest.raises(TypeError, match="dtype must be a real floating torch.dtype"):
        NoiseSchedule.linear(10).to(dtype=dtype)


@pytest.mark.parametrize("betas", [[0.5, 1.0], [1.0], [0.0, 0.1], [0.1, float("nan")], [0.2, -0.1]])
def test_betas_outside_the_open_unit_interval_are_refused(betas):
    """beta = 1 made alphas_cumprod 0: infinite tables and NaN steps (issue 14)."""
    with pytest.raises(ValueError, match=r"betas must be finite and in \(0, 1\)"):
        NoiseSchedule.from_betas(torch.tensor(betas))


@pytest.mark.parametrize("betas", [torch.full((2000,), 0.5), torch.full((3,), 1e-20)])
def test_betas_giving_non_finite_tables_are_refused(betas):
    """alphas_cumprod underflowing to 0 (1/sqrt(ab) = inf), or 1 - beta rounding to 1 (0/0 posterior variance)."""
    with pytest.raises(ValueError, match="non-finite"):
        NoiseSchedule.from_betas(betas)


def test_complex_betas_are_refused():
    with pytest.raises(TypeError, match="betas must be real"):
        NoiseSchedule.from_betas(torch.tensor([0.1, 0.2], dtype=torch.complex64))


def test_numpy_integer_T_is_an_int():
    import numpy as np

    s = NoiseSchedule.linear(np.int64(10))
    assert s.T == 10 and torch.equal(s.betas, NoiseSchedule.linear(10).betas)


def test_exact_tables_are_the_float64_masters():
    s, s64 = NoiseSchedule.linear(100), NoiseSchedule.linear(100, dtype=torch.float64)
    for name in ("alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance"):
        assert s.exact(name).dtype == torch.float64 and torch.equal(s.exact(name), getattr(s64, name))
        assert not torch.equal(s.exact(name), getattr(s, name).double())  # not the float32-rounded values
