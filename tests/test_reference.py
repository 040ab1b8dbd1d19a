"""The reference ops: closed forms on small float64 inputs, gradients, and diffusers as an outside oracle."""
import pytest
import torch

from isofast import NoiseSchedule, reference

D = torch.float64


def sched64(kind="linear", T=1000):
    return getattr(NoiseSchedule, kind)(T, dtype=D)


def test_q_sample_closed_form():
    s = sched64(T=10)
    x0 = torch.tensor([[1.0, -2.0], [0.5, 0.0]], dtype=D)
    eps = torch.tensor([[0.3, 0.1], [-1.0, 2.0]], dtype=D)
    t = torch.tensor([0, 9])
    x_t = reference.q_sample(x0, t, s, eps)
    for b in range(2):
        ab = s.alphas_cumprod[t[b]].item()
        expected = [ab**0.5 * x0[b, i].item() + (1 - ab) ** 0.5 * eps[b, i].item() for i in range(2)]
        assert x_t[b].tolist() == pytest.approx(expected, rel=1e-14)


def loss_by_loops(p, e, lam, mode, w, reduction):
    """The definition of ARCHITECTURE.md written with explicit Python sums over Python floats."""
    B, n = len(p), len(p[0])
    w = [1.0] * B if w is None else w.tolist()
    mse = [sum((p[b][i] - e[b][i]) ** 2 for i in range(n)) / n for b in range(B)]
    s = [sum(p[b][i] ** 2 for i in range(n)) / n for b in range(B)]
    red = (lambda xs: sum(xs) / B) if reduction == "mean" else sum
    if mode == "batch":
        return red([w[b] * mse[b] for b in range(B)]) + lam * (sum(s) / B - 1) ** 2
    terms = [w[b] * (mse[b] + lam * (s[b] - 1) ** 2) for b in range(B)]
    return terms if reduction == "none" else red(terms)


@pytest.mark.parametrize("mode,reduction", [("batch", "mean"), ("batch", "sum"), ("sample", "mean"), ("sample", "sum"), ("sample", "none")])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("shape", [(1, 1), (3, 2), (4, 7), (2, 3, 5)])
def test_loss_equals_independent_expression(mode, reduction, weighted, shape):
    g = torch.Generator().manual_seed(hash((mode, reduction, weighted, shape)) % 2**31)
    p = torch.randn(shape, dtype=D, generator=g) * 1.3
    e = torch.randn(shape, dtype=D, generator=g)
    w = torch.rand(shape[0], dtype=D, generator=g) + 0.5 if weighted else None
    loss, _ = reference.iso_ddpm_loss(p, e, 0.37, mode, w, reduction)
    expected = loss_by_loops(p.reshape(shape[0], -1).tolist(), e.reshape(shape[0], -1).tolist(), 0.37, mode, w, reduction)
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=D), rtol=1e-12, atol=1e-12)


def test_loss_parts():
    p, e = torch.randn(4, 6, dtype=D), torch.randn(4, 6, dtype=D)
    loss, parts = reference.iso_ddpm_loss(p, e, 0.5, "batch")
    torch.testing.assert_close(parts.mse, ((p - e) ** 2).mean())
    torch.testing.assert_close(parts.isotropy, (p**2).mean())
    torch.testing.assert_close(parts.iso, ((p**2).mean() - 1) ** 2)
    torch.testing.assert_close(loss, parts.mse + 0.5 * parts.iso)
    assert not parts.mse.requires_grad


def test_loss_accumulates_in_float32_for_half_inputs():
    p = torch.randn(3, 5).to(torch.bfloat16)
    loss, _ = reference.iso_ddpm_loss(p, torch.zeros_like(p))
    assert loss.dtype == torch.float32


@pytest.mark.parametrize("mode", ["batch", "sample"])
@pytest.mark.parametrize("weighted", [False, True])
def test_loss_gradcheck(mode, weighted):
    p = torch.randn(3, 4, dtype=D, requires_grad=True)
    e = torch.randn(3, 4, dtype=D, requires_grad=True)
    w = (torch.rand(3, dtype=D) + 0.5).requires_grad_() if weighted else None
    inputs = (p, e) + ((w,) if weighted else ())
    fn = lambda p, e, *w: reference.iso_ddpm_loss(p, e, 0.3, mode, w[0] if w else None)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs)


def test_loss_gradient_closed_form():
    """d/dp of the batch loss: 2 (p - e) / (B n) + lambda 2 (S - 1) 2 p / (B n), S the batch isotropy."""
    B, n, lam = 3, 4, 0.7
    p = torch.randn(B, n, dtype=D, requires_grad=True)
    e = torch.randn(B, n, dtype=D)
    reference.iso_ddpm_loss(p, e, lam, "batch")[0].backward()
    S = (p.detach() ** 2).mean()
    expected = 2 * (p.detach() - e) / (B * n) + lam * 2 * (S - 1) * 2 * p.detach() / (B * n)
    torch.testing.assert_close(p.grad, expected, rtol=1e-13, atol=1e-15)


def test_nan_propagates():
    p = torch.randn(2, 3, dtype=D)
    p[1, 2] = float("nan")
    loss, _ = reference.iso_ddpm_loss(p, torch.zeros_like(p))
    assert torch.isnan(loss)


def test_ddpm_step_closed_form():
    s = sched64(T=20)
    x, eps, z = (torch.randn(3, 4, dtype=D) for _ in range(3))
    t = torch.tensor([0, 7, 19])
    for variance in ("fixed_small", "fixed_large"):
        for clip in (False, True):
            out = reference.ddpm_step(x, eps, t, s, z, clip, variance)
            for b in range(3):
                tb = t[b].item()
                ab = s.alphas_cumprod[tb].item()
                ab_prev = s.alphas_cumprod_prev[tb].item()
                beta = s.betas[tb].item()
                x0 = (x[b] - (1 - ab) ** 0.5 * eps[b]) / ab**0.5
                if clip:
                    x0 = x0.clamp(-1, 1)
                mean = beta * ab_prev**0.5 / (1 - ab) * x0 + (1 - ab_prev) * (1 - beta) ** 0.5 / (1 - ab) * x[b]
                var = beta * (1 - ab_prev) / (1 - ab) if variance == "fixed_small" else beta
                expected = mean + (var**0.5 * z[b] if tb > 0 else 0)
                torch.testing.assert_close(out[b], expected, rtol=1e-12, atol=1e-12)


def test_ddim_step_closed_form():
    s = sched64(T=30)
    x, eps, z = (torch.randn(2, 5, dtype=D) for _ in range(3))
    t, t_prev = torch.tensor([29, 4]), torch.tensor([19, -1])
    eta = 0.6
    out = reference.ddim_step(x, eps, t, t_prev, s, eta, z)
    for b in range(2):
        ab = s.alphas_cumprod[t[b]].item()
        ab_prev = s.alphas_cumprod[t_prev[b]].item() if t_prev[b] >= 0 else 1.0
        sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)) ** 0.5
        x0 = (x[b] - (1 - ab) ** 0.5 * eps[b]) / ab**0.5
        expected = ab_prev**0.5 * x0 + (1 - ab_prev - sigma**2) ** 0.5 * eps[b] + sigma * z[b]
        torch.testing.assert_close(out[b], expected, rtol=1e-12, atol=1e-12)


def test_ddim_eta0_is_deterministic_and_inverts_q_sample():
    """With eta = 0 and the true noise as prediction, DDIM from x_t lands exactly on q_sample(x0, t_prev)."""
    s = sched64(T=50)
    x0, eps = torch.randn(2, 3, dtype=D), torch.randn(2, 3, dtype=D)
    t, t_prev = torch.tensor([40, 30]), torch.tensor([10, -1])
    x_t = reference.q_sample(x0, t, s, eps)
    out = reference.ddim_step(x_t, eps, t, t_prev, s, 0.0, torch.full_like(x0, 1e6))  # sigma = 0: the noise must not matter
    expected = torch.stack([reference.q_sample(x0[:1], t_prev[:1], s, eps[:1])[0], x0[1]])
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_isotropy_and_theory():
    x = torch.tensor([[1.0, 1.0], [2.0, 0.0]], dtype=D)
    assert reference.isotropy(x).item() == pytest.approx((1 + 1 + 4 + 0) / 4)
    ab = torch.tensor([1.0, 0.5, 0.0], dtype=D)
    theory = reference.forward_isotropy_theory(10.0, 4, ab)
    assert theory.tolist() == pytest.approx([10.0, 7.0, 4.0])


def test_forward_isotropy_matches_theory_statistically():
    s = sched64(T=100)
    x0 = torch.rand(20000, 8, dtype=D) * 3
    g = torch.Generator().manual_seed(0)
    for t in (0, 30, 99):
        eps = torch.randn(x0.shape, dtype=D, generator=g)
        x_t = reference.q_sample(x0, torch.full((20000,), t), s, eps)
        measured = (x_t**2).sum(1).mean()
        theory = reference.forward_isotropy_theory((x0**2).sum(1).mean(), 8, s.alphas_cumprod[t])
        assert measured.item() == pytest.approx(theory.item(), rel=0.02)


# ----- diffusers as an external oracle -------------------------------------------------------------
@pytest.fixture(params=[("linear", "linear"), ("cosine", "squaredcos_cap_v2")])
def schedules(request):
    from diffusers import DDIMScheduler, DDPMScheduler

    ours, name = request.param
    s = sched64(ours)
    kwargs = dict(num_train_timesteps=1000, beta_schedule=name)
    ddpm = DDPMScheduler(**kwargs, clip_sample=False)
    ddim = DDIMScheduler(**kwargs, clip_sample=False, set_alpha_to_one=True)
    # give diffusers exactly our float64 betas so the comparison tests the step math, not table rounding
    for sch in (ddpm, ddim):
        sch.betas = s.betas.clone()
        sch.alphas = 1 - sch.betas
        sch.alphas_cumprod = torch.cumprod(sch.alphas, 0)
    return s, ddpm, ddim


def test_add_noise_equals_diffusers(schedules):
    s, ddpm, _ = schedules
    x0, eps = torch.randn(4, 3, 2, 2, dtype=D), torch.randn(4, 3, 2, 2, dtype=D)
    t = torch.tensor([0, 1, 500, 999])
    torch.testing.assert_close(reference.q_sample(x0, t, s, eps), ddpm.add_noise(x0, eps, t), rtol=0, atol=1e-6)


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ddpm_step_equals_diffusers(schedules, clip, variance):
    s, ddpm, _ = schedules
    ddpm.config.clip_sample = clip
    ddpm.config.variance_type = variance
    ddpm.set_timesteps(1000)
    for t in (999, 500, 1, 0):
        x, eps = torch.randn(2, 3, 4, dtype=D), torch.randn(2, 3, 4, dtype=D)
        g = torch.Generator().manual_seed(t)
        out_ref = ddpm.step(eps, t, x, generator=g).prev_sample
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(t), dtype=D)  # what diffusers drew
        ours = reference.ddpm_step(x, eps, torch.full((2,), t), s, z, clip, variance)
        torch.testing.assert_close(ours, out_ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("steps", [1000, 50])
def test_ddim_step_equals_diffusers(schedules, eta, steps):
    s, _, ddim = schedules
    ddim.set_timesteps(steps)
    stride = 1000 // steps
    for t in (ddim.timesteps[0].item(), ddim.timesteps[len(ddim.timesteps) // 2].item(), ddim.timesteps[-1].item()):
        x, eps, z = (torch.randn(2, 3, 4, dtype=D) for _ in range(3))
        out_ref = ddim.step(eps, t, x, eta=eta, variance_noise=z).prev_sample
        ours = reference.ddim_step(x, eps, torch.full((2,), t), torch.full((2,), t - stride), s, eta, z)
        torch.testing.assert_close(ours, out_ref, rtol=0, atol=1e-6)
