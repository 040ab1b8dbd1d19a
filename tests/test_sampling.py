"""Sampling loops against step-by-step reference loops, the graph step against the eager loop, and a
Gaussian toy whose exact answer is known."""
import math

import pytest
import torch

from isofast import NoiseKey, NoiseSchedule, reference, sampling
from isofast.noise import calls_for, to_signed
from isofast.ops import backends
from isofast.ops.steps import ddim_step_keyed as ddim_step
from isofast.ops.steps import ddpm_step_keyed as ddpm_step

CPU = torch.device("cpu")


class ToyModel(torch.nn.Module):
    """A fixed smooth eps-predictor of any sample shape (so the loop's arithmetic is non-trivial)."""

    def __init__(self, shape, T):
        super().__init__()
        g = torch.Generator().manual_seed(123)
        self.w = torch.nn.Parameter(torch.randn(shape, generator=g) * 0.5)
        self.T = T

    def forward(self, x, t):
        tt = (t.to(x.dtype) / self.T).reshape(-1, *([1] * (x.ndim - 1)))
        return torch.tanh(x * self.w + tt) * 0.9


def _keys(shape, seed):
    """The documented key schedule: x_T key, then the step seed, both drawn from torch's generator."""
    torch.manual_seed(seed)
    x_key = NoiseKey.draw(shape)
    step_seed = NoiseKey.draw(shape).seed
    numel = math.prod(shape)
    steps = lambda i: NoiseKey(step_seed, i * ((numel + 3) // 4), shape)  # noqa: E731
    return x_key, steps


def _reference_ddpm(model, shape, sched, seed, clip_x0=False, variance="fixed_small"):
    x_key, steps = _keys(shape, seed)
    x = x_key.materialize()
    for i, t in enumerate(range(sched.T - 1, -1, -1)):
        tt = torch.full((shape[0],), t, dtype=torch.int64)
        x = reference.ddpm_step(x, model(x, tt), tt, sched, steps(i).materialize(), clip_x0, variance)
    return x


def _reference_ddim(model, shape, sched, seed, steps_n, eta, clip_x0=False):
    x_key, steps = _keys(shape, seed)
    x = x_key.materialize()
    ratio = sched.T // steps_n
    ts = [ratio * j for j in reversed(range(steps_n))]
    for i, t in enumerate(ts):
        tt = torch.full((shape[0],), t, dtype=torch.int64)
        tp = torch.full((shape[0],), t - ratio if t - ratio >= 0 else -1, dtype=torch.int64)
        x = reference.ddim_step(x, model(x, tt), tt, tp, sched, eta, steps(i).materialize(), clip_x0)
    return x


SHAPES = [(5, 2), (3, 7), (2, 3, 5)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("clip_x0,variance", [(False, "fixed_small"), (True, "fixed_large")])
def test_ddpm_sample_equals_reference_loop(shape, clip_x0, variance):
    sched = NoiseSchedule.linear(T=17, beta_start=1e-3, beta_end=0.2)
    model = ToyModel(shape[1:], sched.T)
    expected = _reference_ddpm(model, shape, sched, seed=7, clip_x0=clip_x0, variance=variance)
    torch.manual_seed(7)
    got = sampling.ddpm_sample(model, shape, sched, clip_x0=clip_x0, variance=variance, backend="reference")
    assert torch.equal(got, expected)  # the same ops in the same order: bit for bit
    torch.manual_seed(7)
    fused = sampling.ddpm_sample(model, shape, sched, clip_x0=clip_x0, variance=variance)  # auto backend
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("steps_n,eta", [(1, 0.0), (4, 0.0), (7, 0.5), (17, 1.0)])
def test_ddim_sample_equals_reference_loop(shape, steps_n, eta):
    sched = NoiseSchedule.linear(T=17, beta_start=1e-3, beta_end=0.2)
    model = ToyModel(shape[1:], sched.T)
    expected = _reference_ddim(model, shape, sched, 11, steps_n, eta, clip_x0=steps_n == 4)
    torch.manual_seed(11)
    got = sampling.ddim_sample(model, shape, sched, steps_n, eta, clip_x0=steps_n == 4, backend="reference")
    assert torch.equal(got, expected)
    torch.manual_seed(11)
    fused = sampling.ddim_sample(model, shape, sched, steps_n, eta, clip_x0=steps_n == 4)
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=2e-5)


def test_generator_makes_runs_repeatable_and_independent_of_global_state():
    sched = NoiseSchedule.linear(T=10, beta_start=1e-3, beta_end=0.2)
    model = ToyModel((3,), sched.T)
    a = sampling.ddpm_sample(model, (4, 3), sched, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(999)
    b = sampling.ddpm_sample(model, (4, 3), sched, generator=torch.Generator().manual_seed(5))
    c = sampling.ddpm_sample(model, (4, 3), sched, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_batch_size_chunks_draw_their_own_keys_in_order():
    sched = NoiseSchedule.linear(T=9, beta_start=1e-3, beta_end=0.2)
    model = ToyModel((2,), sched.T)
    torch.manual_seed(3)
    got = sampling.ddpm_sample(model, (7, 2), sched, batch_size=3, backend="reference")
    # chunks of 3, 3, 1 samples: each draws (x_T key, step seed) from the generator in turn
    torch.manual_seed(3)
    parts = []
    for rows in (3, 3, 1):
        parts.append(sampling.ddpm_sample(model, (rows, 2), sched, backend="reference"))
    assert torch.equal(got, torch.cat(parts))


def test_ddim_timesteps_leading_spacing():
    assert sampling.ddim_timesteps(10, 10) == (list(range(9, -1, -1)), list(range(8, -1, -1)) + [-1])
    assert sampling.ddim_timesteps(1000, 4) == ([750, 500, 250, 0], [500, 250, 0, -1])
    assert sampling.ddim_timesteps(10, 3) == ([6, 3, 0], [3, 0, -1])
    assert sampling.ddpm_timesteps(3) == ([2, 1, 0], [1, 0, -1])
    for bad in (0, 11, 2.0, True):
        with pytest.raises(ValueError, match="steps"):
            sampling.ddim_timesteps(10, bad)


def test_step_keys_of_graph_loop_equal_eager_keys():
    """The device-side key of step i (base + offsets[i]) is the eager NoiseKey's (seed, offset), bitwise."""
    shape = (5, 3)  # 15 elements: 4 Philox calls per step, so offsets are not a multiple of numel
    seed = 2**64 - 12345  # above 2^63: exercises the signed bit-pattern encoding
    loop = sampling.StepLoop(ToyModel(shape[1:], 6), None, torch.zeros(shape), *sampling.ddpm_timesteps(6),
                             "cpu" if _fused("cpu") else "triton")
    loop.reset(torch.zeros(shape), seed)
    for i in range(6):
        loop.index.fill_(i)
        key = sampling.step_key(seed, i, shape)
        assert key.offset == i * calls_for(15)
        assert torch.equal(loop.current_key(), key.as_tensor())
        assert loop.current_key().tolist() == [to_signed(seed), i * 4]


def _fused(name):
    return name in backends.fused("cpu")


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_static_step_loop_equals_eager_loop(backend, kind):
    """The graph path's step body, run uncaptured on CPU, reproduces the eager sampler bit for bit."""
    if not _fused(backend):
        pytest.skip(f"fused backend {backend!r} not available on CPU here")
    shape = (6, 5)
    sched = NoiseSchedule.linear(T=12, beta_start=1e-3, beta_end=0.2)
    model = ToyModel(shape[1:], sched.T)
    torch.manual_seed(21)
    if kind == "ddpm":
        eager = sampling.ddpm_sample(model, shape, sched, backend=backend)
        t_seq, t_prev = sampling.ddpm_timesteps(sched.T)
    else:
        eager = sampling.ddim_sample(model, shape, sched, steps=5, eta=0.8, backend=backend)
        t_seq, t_prev = sampling.ddim_timesteps(sched.T, 5)
    torch.manual_seed(21)
    x_key = NoiseKey.draw(shape)
    step_seed = NoiseKey.draw(shape).seed
    if kind == "ddpm":
        def update(x, eps, t, t_prev, key, name):
            return ddpm_step(x, eps, t, sched, None, key, False, "fixed_small", name)
    else:
        def update(x, eps, t, t_prev, key, name):
            return ddim_step(x, eps, t, t_prev, sched, 0.8, None, key, False, name)
    loop = sampling.StepLoop(model, update, x_key.materialize(), t_seq, t_prev, backend)
    with torch.no_grad():
        static = loop.run(x_key.materialize(), step_seed, _NoBar())
    assert torch.equal(static, eager)


class _NoBar:
    def update(self, n):
        pass


def _gaussian_eps_model(sched, mu, sd):
    """The exact eps-prediction for data N(mu, diag(sd^2)): sqrt(1-ab)(x - sqrt(ab) mu) / (ab sd^2 + 1 - ab)."""
    ab_table = sched.alphas_cumprod.to(torch.float64)

    def model(x, t):
        ab = ab_table[t].reshape(-1, 1)
        eps = (1 - ab).sqrt() * (x.double() - ab.sqrt() * mu) / (ab * sd**2 + 1 - ab)
        return eps.to(x.dtype)

    return model


def _chain_moments(sched, mu, sd):
    """Exact mean and std of the DDPM chain (fixed_small) with the exact model: it is linear-Gaussian,
    x_{t-1} = A_t x_t + B_t + sigma_t z, so m <- A m + B, v <- A^2 v + sigma^2 from x_T ~ N(0, 1)."""
    s = sched.to(dtype=torch.float64)
    m, v = torch.zeros_like(mu), torch.ones_like(mu)
    for t in range(s.T - 1, -1, -1):
        ab = s.alphas_cumprod[t]
        c = (1 - ab).sqrt() / (ab * sd**2 + 1 - ab)
        a0 = (1 - (1 - ab).sqrt() * c) / ab.sqrt()  # x0_hat = a0 x + b0
        b0 = (1 - ab).sqrt() * c * mu
        a = s.posterior_mean_coef1[t] * a0 + s.posterior_mean_coef2[t]
        m = a * m + s.posterior_mean_coef1[t] * b0
        v = a * a * v + (s.posterior_variance[t] if t > 0 else 0.0)
    return m, v.sqrt()


def test_ddpm_and_ddim_eta1_on_gaussian_data_match_the_exact_answer():
    n = 20_000
    sched = NoiseSchedule.linear(T=100, beta_start=1e-3, beta_end=0.2)  # ab_T = 2e-5: x_T is pure noise
    mu = torch.tensor([0.5, -0.3], dtype=torch.float64)
    sd = torch.tensor([0.4, 0.7], dtype=torch.float64)
    model = _gaussian_eps_model(sched, mu, sd)
    m_exact, s_exact = _chain_moments(sched, mu, sd)
    # The discrete chain's answer is near the data's (fixed_small variance shrinks the std a little at T=100).
    torch.testing.assert_close(m_exact, mu, rtol=0, atol=1e-4)
    torch.testing.assert_close(s_exact, sd, rtol=0.1, atol=0)

    gen = lambda: torch.Generator().manual_seed(2024)  # noqa: E731
    ddpm = sampling.ddpm_sample(model, (n, 2), sched, generator=gen()).double()
    ddim = sampling.ddim_sample(model, (n, 2), sched, steps=sched.T, eta=1.0, generator=gen()).double()
    # Same keys, and DDIM(eta=1, steps=T) is algebraically the DDPM step: equal sample by sample.
    torch.testing.assert_close(ddim, ddpm, rtol=0, atol=1e-4)
    for samples in (ddpm, ddim):
        se_mean = s_exact / math.sqrt(n)
        se_std = s_exact / math.sqrt(2 * n)
        assert ((samples.mean(0) - mu).abs() < 5 * se_mean).all(), samples.mean(0)
        assert ((samples.std(0) - s_exact).abs() < 5 * se_std).all(), (samples.std(0), s_exact)


def test_ddim_eta0_is_deterministic_given_x_T():
    sched = NoiseSchedule.linear(T=20, beta_start=1e-3, beta_end=0.2)
    model = ToyModel((3,), sched.T)
    torch.manual_seed(1)
    a = sampling.ddim_sample(model, (4, 3), sched, steps=5, eta=0.0)
    # Only x_T matters: rebuild it from the first key and run the reference with zero noise.
    torch.manual_seed(1)
    x = NoiseKey.draw((4, 3)).materialize()
    for t, tp in zip(*sampling.ddim_timesteps(20, 5), strict=True):
        tt, tpp = torch.full((4,), t), torch.full((4,), tp)
        x = reference.ddim_step(x, model(x, tt), tt, tpp, sched, 0.0, torch.zeros_like(x))
    torch.testing.assert_close(a, x, rtol=1e-5, atol=1e-5)


def test_bad_arguments_raise_clear_errors():
    sched = NoiseSchedule.linear(T=5)
    model = ToyModel((2,), 5)
    with pytest.raises(ValueError, match="shape"):
        sampling.ddpm_sample(model, (0, 2), sched)
    with pytest.raises(TypeError, match="sched"):
        sampling.ddpm_sample(model, (2, 2), "linear")
    with pytest.raises(ValueError, match="variance"):
        sampling.ddpm_sample(model, (2, 2), sched, variance="learned")
    with pytest.raises(ValueError, match="eta"):
        sampling.ddim_sample(model, (2, 2), sched, steps=5, eta=-1.0)
    with pytest.raises(ValueError, match="steps"):
        sampling.ddim_sample(model, (2, 2), sched, steps=6)
    with pytest.raises(ValueError, match="batch_size"):
        sampling.ddpm_sample(model, (2, 2), sched, batch_size=0)
    with pytest.raises(TypeError, match="model"):
        sampling.ddpm_sample("not a model", (2, 2), sched)
    with pytest.raises(ValueError, match="eps_pred"):
        sampling.ddpm_sample(lambda x, t: x[:, :1], (2, 2), sched)


def test_cpu_ignores_cuda_graph_flag():
    sched = NoiseSchedule.linear(T=5)
    model = ToyModel((2,), 5)
    torch.manual_seed(0)
    a = sampling.ddpm_sample(model, (3, 2), sched, cuda_graph=True)
    torch.manual_seed(0)
    b = sampling.ddpm_sample(model, (3, 2), sched, cuda_graph=False)
    assert torch.equal(a, b)


cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


@cuda_only
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_cuda_graph_equals_eager_on_gpu(kind):
    sched = NoiseSchedule.linear(T=50)
    model = ToyModel((2,), sched.T).cuda()
    kwargs = dict(device="cuda", batch_size=300)  # 2 chunk sizes (300, 100): a graph each, one reused
    run = (lambda **kw: sampling.ddpm_sample(model, (700, 2), sched, **kw)) if kind == "ddpm" else (
        lambda **kw: sampling.ddim_sample(model, (700, 2), sched, steps=10, eta=0.5, **kw))
    graph = run(generator=torch.Generator().manual_seed(4), cuda_graph=True, **kwargs)
    eager = run(generator=torch.Generator().manual_seed(4), cuda_graph=False, **kwargs)
    torch.testing.assert_close(graph, eager, rtol=0, atol=1e-6)
    again = run(generator=torch.Generator().manual_seed(4), cuda_graph=True, **kwargs)
    assert torch.equal(graph, again)


@cuda_only
def test_cuda_graph_with_reference_backend_is_refused():
    sched = NoiseSchedule.linear(T=5)
    model = ToyModel((2,), 5).cuda()
    with pytest.raises(ValueError, match="cuda_graph"):
        sampling.ddpm_sample(model, (3, 2), sched, device="cuda", cuda_graph=True, backend="reference")


def test_backend_list_helper_sees_cpu_backends():
    names = backends.fused("cpu")
    assert set(names) <= {"cpu", "triton"}
    assert ("cpu" in names) == backends.status("cpu")[0]


@pytest.mark.parametrize("T,steps", [(1000, 50), (1000, 7), (100, 100)])
def test_ddim_timesteps_equal_diffusers_leading_spacing(T, steps):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler(num_train_timesteps=T, timestep_spacing="leading", steps_offset=0,
                                    set_alpha_to_one=True)
    sched.set_timesteps(steps)
    t, t_prev = sampling.ddim_timesteps(T, steps)
    assert sched.timesteps.tolist() == t
    ratio = T // steps
    assert [max(s - ratio, -1) for s in t] == t_prev  # diffusers' prev_timestep, with ab_prev = 1 below 0
