"""Fuzz: every public op on every fused backend against the float64 reference, values and gradients.

One hypothesis example draws a problem (sample shape, data dtype, memory layout, schedule kind, length
and dtype, timesteps, the noise as a key, with the offset near 2^64 where the counters wrap, or as a
tensor) and runs q_sample (and its gradient in x0), iso_ddpm_loss (every prediction type, with and without
min-SNR weights, and its gradient in eps_pred),
ddpm_step and ddim_step on the backend under test. The oracle is `isofast.reference` in float64 on
the same (rounded) inputs with the schedule's exact float64 tables, and every bound is per element, in
the data dtype's ulp of the result plus the compute dtype's ulp of the size of the terms that made it
(so a cancellation is not mistaken for an error, and a coefficient of 1e3 does not hide one):

    |got - want| <= ulp_out (|want| + smallest normal) + 8 ulp_acc size + NOISE_ATOL |noise coefficient|

the last term for noise regenerated from a key (generators agree to 4e-6, ARCHITECTURE.md).
CI runs a bounded, repeatable sample per backend; ISOFAST_FUZZ=long a fresh and much larger one.
"""
from __future__ import annotations

import math

import torch
from conftest import KEYS, LAYOUTS, NOISE_ATOL, acc, fuzz_settings, laid_out
from hypothesis import given
from hypothesis import strategies as st

import isofast
from isofast import NoiseKey, NoiseSchedule, reference
from isofast.ops import operands

# (CI examples, ISOFAST_FUZZ=long examples) per backend family: the Triton interpreter runs programs one by one
EXAMPLES = {"compiled": (150, 5000), "triton": (40, 1000)}
MAX_N = {"compiled": 300, "triton": 70}  # elements per sample
WRAP_OFFSETS = st.integers(2**64 - 40, 2**64 - 1)  # a draw of more than a few elements wraps the counter


@st.composite
def problems(draw, dtypes, max_n):
    B = draw(st.integers(1, 4))
    tail = draw(st.sampled_from([(1,), (2,), (3,), (7,), (3, 4, 4), (2, 5, 3), (1, 1, 1)])
                | st.lists(st.integers(1, 9), min_size=1, max_size=3).map(tuple))
    if math.prod(tail) > max_n:
        tail = (max_n,)
    T = draw(st.sampled_from([1, 2, 3]) | st.integers(1, 60))
    return dict(
        shape=(B, *tail), dtype=draw(st.sampled_from(dtypes)), layout=draw(st.sampled_from(LAYOUTS)),
        kind=draw(st.sampled_from(["linear", "cosine", "scaled_linear"])), T=T,
        sched_dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        seed=draw(KEYS), offset=draw(KEYS | WRAP_OFFSETS), keyed=draw(st.booleans()),
        data_seed=draw(st.integers(0, 2**31 - 1)),
    )


def _within(got, want, size, dtype, noise_coef, keyed, what):
    """The per-element bound of the module docstring (float64 comparison on the CPU)."""
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    out = torch.finfo(dtype)  # its ulp, down to the spacing of the subnormals (float16 gradients reach them)
    bound = (out.eps * want.abs() + out.eps * out.tiny + 8 * torch.finfo(acc(dtype)).eps * size.detach().cpu().double()
             + (NOISE_ATOL * noise_coef.detach().cpu().double().abs() if keyed else 0.0))
    err = (got - want).abs()
    # a true value beyond the dtype's range rounds to +-inf (x0-prediction's gradient near t = 0 in float16)
    overflow = torch.isfinite(want) & torch.isinf(want.to(dtype)) & (got == want.to(dtype).double())
    bad = ~(err <= bound) & ~overflow  # NaN counts as bad
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {err.numel()} elements off, worst error "
                           f"{(err / bound).nan_to_num(float('inf')).max():.3g} x its bound: got {got[bad][:4].tolist()}, "
                           f"want {want[bad][:4].tolist()}")


def _per_sample(table, t, ndim):
    return table.double()[t].reshape(-1, *([1] * (ndim - 1)))


class Case:
    """The tensors of one example, on the backend's device, and their float64 CPU originals."""

    def __init__(self, p, device):
        self.p, self.device, self.dtype = p, device, p["dtype"]
        gen = torch.Generator().manual_seed(p["data_seed"])
        self.sched = getattr(NoiseSchedule, p["kind"])(p["T"], dtype=p["sched_dtype"])
        self.exact = self.sched.to(dtype=torch.float64)
        B, shape = p["shape"][0], p["shape"]
        self.t = torch.randint(0, p["T"], (B,), generator=gen)
        self.t_prev = (self.t - 1 - torch.randint(0, 3, (B,), generator=gen)).clamp_min(-1)  # back in time

        def data(scale=1.0):
            return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(self.dtype)

        self.x, self.e_pred, self.z = data(), data(), data()
        self.key = NoiseKey(p["seed"], p["offset"], shape, self.dtype, device)
        # the oracle's noise: the contract's float32 normals, or the explicit tensor as the op sees it
        self.eps = self.key.materialize(torch.float32).cpu().double() if p["keyed"] else self.z.double()

    def on_device(self, x):
        return laid_out(x.detach().clone().to(self.device), self.p["layout"])  # a fresh leaf, never the original

    def noise(self):
        return self.key if self.p["keyed"] else self.on_device(self.z)


def _q_sample(case, name):
    x0 = case.on_device(case.x).requires_grad_()
    x_t, _ = isofast.q_sample(x0, case.t.to(case.device), case.sched, case.noise(), backend=name)
    g = torch.linspace(-1, 1, x_t.numel(), dtype=torch.float64).reshape(x_t.shape)
    x_t.backward(g.to(x_t.dtype).to(case.device))
    a = _per_sample(case.exact.sqrt_alphas_cumprod, case.t, x0.ndim)
    b = _per_sample(case.exact.sqrt_one_minus_alphas_cumprod, case.t, x0.ndim)
    x64 = case.x.double()
    keyed = case.p["keyed"]
    _within(x_t, a * x64 + b * case.eps, (a * x64).abs() + (b * case.eps).abs(), case.dtype, b.expand_as(x64), keyed,
            "q_sample")
    g_used = g.to(case.dtype).double()
    _within(x0.grad, a * g_used, (a * g_used).abs(), case.dtype, torch.zeros(()), keyed, "q_sample d/dx0")


def _prediction_terms(case, prediction_type):
    """|coef| (5, B, 1) of the residual and implied eps (`operands.PREDICTION_COEFFICIENTS`; eps: 1, 0, 1, 0, 0)
    in float64, for the sizes of the terms."""
    if prediction_type == "epsilon":
        k = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0], dtype=torch.float64)[:, None].expand(5, case.t.numel())
    else:
        s = case.exact.sqrt_alphas_cumprod.double()[case.t]
        sigma = case.exact.sqrt_one_minus_alphas_cumprod.double()[case.t]
        k = torch.stack(operands.PREDICTION_COEFFICIENTS[prediction_type](s, sigma))
    return k.abs().unsqueeze(-1)


def _loss(case, name, draw):
    B = case.p["shape"][0]
    mode = draw(st.sampled_from(["batch", "sample"]))
    reduction = draw(st.sampled_from(["mean", "sum"] + (["none"] if mode == "sample" else [])))
    groups = draw(st.sampled_from([g for g in (1, 2, 4) if B % g == 0]))
    lam = draw(st.sampled_from([0.0, 0.3, 2.5]))
    weighted = draw(st.booleans())
    prediction_type = draw(st.sampled_from(reference.PREDICTION_TYPES))
    snr_gamma = draw(st.sampled_from([None, 0.5, 5.0]))
    w = torch.rand(B, generator=torch.Generator().manual_seed(case.p["data_seed"]), dtype=torch.float64) + 0.5
    p = case.on_device(case.e_pred).requires_grad_()
    w_arg = w.to(acc(case.dtype)).to(case.device) if weighted else None
    # the context as keywords (the key q_sample returns carries the same: test_iso_loss.py)
    context = dict(prediction_type=prediction_type, snr_gamma=snr_gamma, x0=case.on_device(case.x),
                   t=case.t.to(case.device), schedule=case.sched)
    loss = isofast.iso_ddpm_loss(p, case.noise(), lam, mode, w_arg, reduction, backend=name, groups=groups, **context)
    upstream = torch.linspace(0.5, 1.5, loss.numel(), dtype=torch.float64).reshape(loss.shape)
    loss.backward(upstream.to(loss.dtype).to(case.device))

    p64 = case.e_pred.double().requires_grad_()
    w64 = w.to(acc(case.dtype)).double() if weighted else None
    x64 = case.x.double()
    want, _ = reference.iso_ddpm_loss(p64, case.eps, lam, mode, w64, reduction, groups, prediction_type=prediction_type,
                                      x0=x64, t=case.t, sched=case.exact, snr_gamma=snr_gamma)
    want.backward(upstream.to(loss.dtype).double())
    # the size of the loss: its sums before normalising (float32 accumulates n terms), the penalty's too;
    # r and h: the sizes of the residual and the implied eps from the magnitudes of their terms
    n = p64[0].numel()
    w_max = w.max() if weighted else torch.tensor(1.0, dtype=torch.float64)
    if snr_gamma is not None:
        w_max = w_max * reference.min_snr_weights(reference.snr(case.t, case.exact), snr_gamma, prediction_type).max()
    k = _prediction_terms(case, prediction_type)
    pa, ea, xa = (v.detach().abs().reshape(B, -1) for v in (p64, case.eps, x64))
    r = pa + k[0] * ea + k[1] * xa
    h = k[2] * pa + k[3] * ea + k[4] * xa
    s_max = (h**2).mean(dim=1).max()
    size_loss = w_max * (r**2).sum() + (lam + 1) * ((h**2).sum() + B) * (1 + s_max)
    noise_coef = 2 * (k[0].max() * r.max() * w_max + 2 * (lam + 1) * k[3].max() * h.max() * (1 + s_max)) * torch.ones(())
    what = f"{prediction_type} snr_gamma={snr_gamma} {mode}/{reduction}/groups={groups}/lambda={lam}"
    _within(loss, want, size_loss * torch.ones_like(want), acc(case.dtype), noise_coef, case.p["keyed"],
            f"iso_ddpm_loss {what}")
    # the penalty's slope carries S - 1, whose rounding is 2 h times that of h (a few roundings of each of its terms)
    scale = (2 / n) * (lam + 1) * w_max * (1 + 4 * s_max) * upstream.abs().max()
    g_size = p64.grad.abs().max() + scale * (r.max() + k[2].max() * h.max())
    _within(p.grad, p64.grad, g_size * torch.ones_like(p64.grad), case.dtype,
            scale * (k[0].max() + k[2].max() * k[3].max()) * torch.ones(()), case.p["keyed"],
            f"iso_ddpm_loss d/deps_pred {what}")


def _steps(case, name, draw):
    clip = draw(st.booleans())
    variance = draw(st.sampled_from(["fixed_small", "fixed_large"]))
    eta = draw(st.sampled_from([0.0, 0.5, 1.0]))
    t, t_prev, nd = case.t, case.t_prev, case.x.ndim
    x, ep = case.on_device(case.x), case.on_device(case.e_pred)
    x64, ep64 = case.x.double(), case.e_pred.double()
    a = _per_sample(case.exact.sqrt_recip_alphas_cumprod, t, nd)
    b = _per_sample(case.exact.sqrt_recipm1_alphas_cumprod, t, nd)
    x0_size = (a * x64).abs() + (b * ep64).abs()
    if clip:  # an x0 clamped with room to spare is exactly +-1 on both sides
        firmly = (a * x64 - b * ep64).abs() > 1 + 16 * torch.finfo(acc(case.dtype)).eps * x0_size
        x0_size = torch.where(firmly, 1.0, x0_size)

    got = isofast.ddpm_step(x, ep, t.to(case.device), case.sched, case.noise(), clip_x0=clip, variance=variance,
                            backend=name)
    want = reference.ddpm_step(x64, ep64, t, case.exact, case.eps, clip, variance)
    c1 = _per_sample(case.exact.posterior_mean_coef1, t, nd)
    c2 = _per_sample(case.exact.posterior_mean_coef2, t, nd)
    sigma = _per_sample(case.exact.posterior_std(variance), t, nd) * (t > 0).reshape(-1, *([1] * (nd - 1)))
    size = c1 * x0_size + (c2 * x64).abs() + (sigma * case.eps).abs()
    _within(got, want, size, case.dtype, sigma.expand_as(x64), case.p["keyed"], f"ddpm_step clip={clip} {variance}")

    got = isofast.ddim_step(x, ep, t.to(case.device), t_prev.to(case.device), case.sched, eta, case.noise(),
                            clip_x0=clip, backend=name)
    want = reference.ddim_step(x64, ep64, t, t_prev, case.exact, eta, case.eps, clip)
    c_x0, c_eps, sig = (c.reshape(-1, *([1] * (nd - 1))) for c in case.exact.ddim_coefficients(t, t_prev, eta))
    # sigma hangs on 1 - ab/ab_prev, a cancellation in every implementation (the oracle's included): known to
    # cond = ab_prev / (ab_prev - ab) times the rounding of ab; c_eps = sqrt(1 - ab_prev - sigma^2) cancels
    # again where sigma^2 nears 1 - ab_prev, so its error is ~ cond (1 - ab_prev) / c_eps roundings
    ab = _per_sample(case.exact.alphas_cumprod, t, nd)
    ab_prev = torch.where(t_prev >= 0, case.exact.alphas_cumprod[t_prev.clamp_min(0)], 1.0).reshape(ab.shape)
    if eta:
        cond = 1 + ab_prev / (ab_prev - ab)
        c_eps_size = c_eps + cond * torch.where(c_eps > 0, (1 - ab_prev) / c_eps, torch.zeros_like(c_eps))
    else:
        cond, c_eps_size = 1.0, c_eps
    size = c_x0 * x0_size + (c_eps_size * ep64).abs() + cond * (sig * case.eps).abs()
    _within(got, want, size, case.dtype, sig.expand_as(x64), case.p["keyed"], f"ddim_step clip={clip} eta={eta}")


def test_fuzz_every_op_against_the_float64_reference(backend):
    ci, long = EXAMPLES[backend.family]

    @fuzz_settings(ci_examples=ci, long_examples=long)
    @given(p=problems(backend.dtypes, MAX_N[backend.family]), data=st.data())
    def run(p, data):
        case = Case(p, backend.device)
        _q_sample(case, backend.name)
        _loss(case, backend.name, data.draw)
        _steps(case, backend.name, data.draw)

    run()
