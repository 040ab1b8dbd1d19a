"""The sampler steps ddpm_step and ddim_step on every fused backend, the reference beside them.

The primitives ``ddpm_step(x, eps_pred, t, table, e, key, clip_x0)`` and ``ddim_step(x, eps_pred, t,
t_prev, table, eta, e, key, clip_x0)`` (``torch.ops.isofast_C`` and ``torch.ops.isofast_triton``)
against their formulas, with explicit noise ``e`` and with noise from the device key tensor; argument
checks; then the public ``isofast.ddpm_step``/``ddim_step`` against ``backend="reference"``. The fused
steps have no autograd: inputs that require grad go to the reference (checked here too).
"""
from __future__ import annotations

import pytest
import torch
from conftest import (
    DTYPES,
    EDGE_EXAMPLES,
    IMAGE_SHAPES,
    KEYS,
    LAYOUTS,
    LENGTHS,
    NOISE_ATOL,
    PRIMITIVE_SHAPES,
    PRIMITIVE_TOL,
    PUBLIC_TOL,
    U64,
    acc,
    check,
    close,
    eps_of,
    key_tensor,
    laid_out,
    on,
    rand,
)
from hypothesis import strategies as st

import isofast
from isofast import NoiseKey, NoiseSchedule, noise, reference


def ddpm_expr(x, ep, t, table, z, clip):
    a = acc(x.dtype)
    xa, ea = x.to(a), ep.to(a)
    x0 = table[0, t, None] * xa - table[1, t, None] * ea
    if clip:
        x0 = x0.clamp(-1, 1)
    nz = (t > 0).to(a)[:, None]
    return (table[2, t, None] * x0 + table[3, t, None] * xa + nz * table[4, t, None] * z.to(a)).to(x.dtype)


def ddim_expr(x, ep, t, t_prev, table, eta, z, clip):
    """The DDIM step from the (6, T) table's rows 1/sqrt(ab), sqrt(1/ab - 1), sqrt(ab), sqrt(1 - ab), ab, 1 - ab."""
    a = acc(x.dtype)
    xa, ea = x.to(a), ep.to(a)
    last, prev = t_prev < 0, t_prev.clamp_min(0)
    one, zero = torch.ones_like(table[4, t]), torch.zeros_like(table[4, t])
    ab, om = table[4, t], table[5, t]
    ab_prev, om_prev = torch.where(last, one, table[4, prev]), torch.where(last, zero, table[5, prev])
    x0 = table[0, t, None] * xa - table[1, t, None] * ea
    if clip:
        x0 = x0.clamp(-1, 1)
    sigma = eta * (om_prev / om * (1 - ab / ab_prev)).sqrt()
    c_eps = (om_prev - sigma**2).clamp_min(0).sqrt() if eta else torch.where(last, zero, table[3, prev])
    c_x0 = torch.where(last, one, table[2, prev])
    return (c_x0[:, None] * x0 + c_eps[:, None] * ea + sigma[:, None] * z.to(a)).to(x.dtype)


def _schedule(T: int, dtype: torch.dtype, variance: str = "fixed_small", device="cpu"):
    """(the (5, T) DDPM table, the (6, T) DDIM table) in the table dtype of ``dtype`` data, from float64."""
    betas = torch.linspace(1e-4, 0.2, T, dtype=torch.float64)
    alphas = 1 - betas
    acp = alphas.cumprod(0)
    acp_prev = torch.cat([torch.ones(1, dtype=torch.float64), acp[:-1]])
    post_var = betas * (1 - acp_prev) / (1 - acp) if variance == "fixed_small" else betas
    table = torch.stack([
        acp.rsqrt(), (1 / acp - 1).sqrt(), betas * acp_prev.sqrt() / (1 - acp),
        (1 - acp_prev) * alphas.sqrt() / (1 - acp), post_var.sqrt(),
    ])
    ddim = torch.stack([acp.rsqrt(), (1 / acp - 1).sqrt(), acp.sqrt(), (1 - acp).sqrt(), acp, 1 - acp])
    return table.to(acc(dtype)).contiguous().to(device), ddim.to(acc(dtype)).contiguous().to(device)


# ---------------------------------------------------------------- the primitives
@pytest.mark.parametrize("explicit", [False, True], ids=["keyed", "explicit"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ddpm_step_equals_formula(backend, dtype, explicit):
    backend.skip_unless_takes(dtype)
    T, dev = 20, backend.device
    tol = PRIMITIVE_TOL[backend.family][dtype]
    # the step coefficients reach ~1/sqrt(ab_T) ~ 5: scale the tolerance of the noise term with them
    extra = 0.0 if explicit else backend.pick(compiled=3 * NOISE_ATOL, triton=0.0)

    def body(shape, seed, offset, data_seed, clip, variance):
        B, n = shape
        gen = torch.Generator().manual_seed(data_seed)
        table, _ = _schedule(T, dtype, variance, dev)
        t = torch.randint(0, T, (B,), generator=gen).to(dev)
        t[0] = 0  # the t = 0 row (the last step) adds no noise
        x, ep = rand((B, n), dtype, gen, device=dev), rand((B, n), dtype, gen, device=dev)
        z = rand((B, n), dtype, gen, device=dev) if explicit else eps_of(seed, offset, B, n, dev)
        key = key_tensor(seed, offset, dev)
        # with explicit noise the key is optional: the compiled ops get it too (and ignore it), Triton none
        key_arg = backend.pick(compiled=key, triton=None) if explicit else key
        got = backend.ops.ddpm_step(x, ep, t, table, z if explicit else None, key_arg, clip)
        assert got.dtype == dtype and got.shape == (B, n)
        close(got, ddpm_expr(x, ep, t, table, z, clip), tol, extra_atol=extra)

    check(backend.pick(compiled=10, triton=4), body, [dict(ex, clip=ex["data_seed"] == 0,
                                                           variance="fixed_large" if ex["data_seed"] == 0 else "fixed_small")
                                                      for ex in EDGE_EXAMPLES],
          shape=PRIMITIVE_SHAPES[backend.family], seed=KEYS, offset=KEYS, data_seed=st.integers(0, 2**31),
          clip=st.booleans(), variance=st.sampled_from(["fixed_small", "fixed_large"]))


@pytest.mark.parametrize("eta", [0.0, 0.5, 0.7, 1.0])
@pytest.mark.parametrize("explicit", [False, True], ids=["keyed", "explicit"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ddim_step_equals_formula(backend, dtype, explicit, eta):
    backend.skip_unless_takes(dtype)
    T, dev = 20, backend.device
    tol = PRIMITIVE_TOL[backend.family][dtype]
    extra = 0.0 if explicit else backend.pick(compiled=3 * NOISE_ATOL, triton=0.0)
    # (1 - ab)/sqrt(ab) in the kernels' order vs the formula's: relative to the coefficients' size
    extra += backend.pick(compiled={torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 0.0), triton=0.0)

    def body(shape, seed, offset, data_seed, clip):
        B, n = shape
        gen = torch.Generator().manual_seed(data_seed)
        _, acp = _schedule(T, dtype, device=dev)
        t = torch.randint(0, T, (B,), generator=gen)
        t[0] = 0
        t_prev = torch.clamp(t - torch.randint(1, 5, (B,), generator=gen), min=-1)
        t_prev[-1] = -1  # jump straight to x0
        t, t_prev = t.to(dev), t_prev.to(dev)
        x, ep = rand((B, n), dtype, gen, device=dev), rand((B, n), dtype, gen, device=dev)
        z = rand((B, n), dtype, gen, device=dev) if explicit else eps_of(seed, offset, B, n, dev)
        key = key_tensor(seed, offset, dev)
        key_arg = backend.pick(compiled=key, triton=None) if explicit else key
        got = backend.ops.ddim_step(x, ep, t, t_prev, acp, eta, z if explicit else None, key_arg, clip)
        assert got.dtype == dtype and got.shape == (B, n)
        close(got, ddim_expr(x, ep, t, t_prev, acp, eta, z, clip), tol, extra_atol=extra)

    check(backend.pick(compiled=10, triton=4), body, [dict(ex, clip=ex["data_seed"] == 0) for ex in EDGE_EXAMPLES],
          shape=PRIMITIVE_SHAPES[backend.family], seed=KEYS, offset=KEYS, data_seed=st.integers(0, 2**31),
          clip=st.booleans())


def test_ddim_eta_zero_ignores_key(backend):
    dev = backend.device
    B, n = 2, 10
    _, acp = _schedule(10, torch.float32, device=dev)
    x, ep = torch.randn(B, n, device=dev), torch.randn(B, n, device=dev)
    t, t_prev = torch.tensor([5, 3], device=dev), torch.tensor([2, -1], device=dev)
    a = backend.ops.ddim_step(x, ep, t, t_prev, acp, 0.0, None, torch.tensor([1, 2], device=dev), False)
    b = backend.ops.ddim_step(x, ep, t, t_prev, acp, 0.0, None, torch.tensor([3, 4], device=dev), False)
    assert torch.equal(a, b)


@on("cpu", "cuda")
@pytest.mark.parametrize("B,n", [(3000, 2), (1400, 3), (50, 301), (9, 1023)])
def test_ddpm_step_short_rows_packed_several_per_tile(backend, B, n):
    # Rows shorter than half a tile share a tile and its noise fill; tiles after the first start
    # mid-stream. Rows with no noise (t = 0) beside rows with noise in the same tile.
    seed, offset = 2**40 + 5, 2**33 + 1
    gen = torch.Generator().manual_seed(B * n)
    p = torch.randn(B, n, generator=gen)
    eps = eps_of(seed, offset, B, n)
    t = torch.randint(0, 10, (B,), generator=gen)
    t[::7] = 0
    table = torch.rand(5, 10, generator=gen, dtype=torch.float32) + 0.1
    dev = backend.device
    out = backend.ops.ddpm_step(p.to(dev), (p * 0.5).to(dev), t.to(dev), table.to(dev), None,
                                key_tensor(seed, offset, dev), False)
    torch.testing.assert_close(out.cpu(), ddpm_expr(p, p * 0.5, t, table, eps, False), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- argument checks of the ops
@on("cpu", "cuda")
def test_compiled_steps_bad_input_raise_clear_errors(backend):
    dev = backend.device
    x = torch.randn(3, 8, device=dev)
    t = torch.zeros(3, dtype=torch.int64, device=dev)
    tab = torch.full((6, 10), 0.5, device=dev)
    ops = torch.ops.isofast_C
    with pytest.raises(RuntimeError, match="key must be"):
        ops.ddpm_step(x, x, t, torch.ones(5, 10, device=dev), None, torch.tensor([1, 2, 3], device=dev), False)
    with pytest.raises(RuntimeError, match="key .* is required when e is None"):
        ops.ddpm_step(x, x, t, torch.ones(5, 10, device=dev), None, None, False)
    with pytest.raises(RuntimeError, match="table must have shape"):
        ops.ddpm_step(x, x, t, torch.ones(4, 10, device=dev), None, torch.tensor([1, 2], device=dev), False)
    if dev.type == "cpu":  # on CUDA the indices are checked by a device-side assert, which no test can catch
        with pytest.raises(RuntimeError, match=r"t_prev\[0\] = -2"):
            ops.ddim_step(x, x, t, t - 2, tab, 0.0, None, torch.tensor([1, 2], device=dev), False)
    with pytest.raises(RuntimeError, match="key .* is required when e is None"):
        ops.ddim_step(x, x, t, t, tab, 0.5, None, None, False)
    with pytest.raises(RuntimeError, match=r"table must have shape \(6, T\)"):
        ops.ddim_step(x, x, t + 1, t, tab[:5], 0.5, None, torch.tensor([1, 2], device=dev), False)


@on("cpu")
def test_compiled_cpu_ddim_step_refuses_a_step_forward_in_time(backend):
    """A step forward in time (or in place) would take the sqrt of a negative number: NaN or garbage.
    (On CUDA the kernel asserts it instead: reading t on the host would cost a sync.)"""
    x, t = torch.randn(3, 8), torch.ones(3, dtype=torch.int64)
    with pytest.raises(RuntimeError, match=r"t_prev\[0\] = 2 must be < t\[0\] = 1"):
        torch.ops.isofast_C.ddim_step(x, x, t, t + 1, torch.full((6, 10), 0.5), 0.5, None, torch.tensor([1, 2]), False)


@on("triton")
def test_triton_steps_without_key_or_noise_are_refused(backend):
    dev = backend.device
    table = torch.zeros(5, 23, device=dev)
    x = torch.zeros(1, 3, device=dev)
    t = torch.zeros(1, dtype=torch.int64, device=dev)
    with pytest.raises(ValueError, match="noise"):
        backend.ops.ddpm_step(x, x, t, table, None, None, False)
    with pytest.raises(ValueError, match="noise"):
        backend.ops.ddim_step(x, x, t, t, torch.zeros(6, 23, device=dev), 0.5, None, None, False)


# ---------------------------------------------------------------- the public steps against the reference
def _key(shape, dtype, seed, offset, device):
    return NoiseKey(seed=seed, offset=offset, shape=shape, dtype=dtype, device=device)


def test_public_ddpm_step_bad_input_same_errors_as_reference(backend):
    sched = NoiseSchedule.linear(T=10)
    x0 = torch.randn(2, 3, device=backend.device)
    errors = []
    for name in (backend.name, "reference"):
        with pytest.raises((ValueError, TypeError)) as info:
            isofast.ddpm_step(x0, x0[:1], torch.zeros(2, dtype=torch.int64, device=backend.device), sched, backend=name)
        errors.append((type(info.value), str(info.value)))
    assert errors[0] == errors[1]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_public_steps_equal_reference(backend, dtype):
    backend.skip_unless_takes(dtype)
    dev = backend.device
    sched = NoiseSchedule.cosine(T=50, dtype=acc(dtype))  # float64 data: tables built in float64 on both sides
    # cosine schedule: 1/sqrt(ab) reaches ~1e2 near T, so compare relative to the coefficients' size
    scale = float(sched.sqrt_recip_alphas_cumprod.max())

    def body(shape, seed, keyed, clip, eta, variance):
        B = shape[0]
        x = torch.randn(shape, dtype=torch.float64).to(dtype).to(dev)
        ep = torch.randn(shape, dtype=torch.float64).to(dtype).to(dev)
        t = torch.randint(0, 50, (B,)).to(dev)
        t_prev = torch.clamp(t - 7, min=-1)
        z = _key(shape, dtype, seed, 5, dev) if keyed else torch.randn(shape, dtype=torch.float64).to(dtype).to(dev)
        extra = (NOISE_ATOL * 2 if keyed else 0.0) + {torch.float64: 1e-12, torch.float32: 2e-6}.get(dtype, 0.0) * scale
        got = isofast.ddpm_step(x, ep, t, sched, z, clip_x0=clip, variance=variance, backend=backend.name)
        want = isofast.ddpm_step(x, ep, t, sched, z, clip_x0=clip, variance=variance, backend="reference")
        assert got.dtype == want.dtype == dtype and got.shape == want.shape
        close(got, want, PUBLIC_TOL[dtype], extra_atol=extra, msg="ddpm")
        got = isofast.ddim_step(x, ep, t, t_prev, sched, eta, z, clip_x0=clip, backend=backend.name)
        want = isofast.ddim_step(x, ep, t, t_prev, sched, eta, z, clip_x0=clip, backend="reference")
        assert got.dtype == want.dtype == dtype and got.shape == want.shape
        close(got, want, PUBLIC_TOL[dtype], extra_atol=extra, msg="ddim")

    check(6, body, shape=IMAGE_SHAPES, seed=U64, keyed=st.booleans(), clip=st.booleans(),
          eta=st.sampled_from([0.0, 1.0]), variance=st.sampled_from(["fixed_small", "fixed_large"]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_public_steps_equal_reference_given_key_and_t(backend, dtype):
    dev = backend.device
    sched = NoiseSchedule.cosine(T=30).to(device=dev)
    # the reference multiplies by float64-derived tables and, for half dtypes, uses the noise
    # rounded to the data dtype (NoiseKey.materialize) where the kernel keeps it in fp32: about
    # one ulp of the output at the scale of its terms (a wrong draw is off by ~sigma)
    rtol, atol = {torch.float32: (1e-5, 2e-5), torch.bfloat16: (1.6e-2, 1.6e-2), torch.float16: (2e-3, 2e-3)}[dtype]

    def body(data_seed, batch, n, eta, clip_x0):
        gen = torch.Generator().manual_seed(data_seed)
        x = torch.randn(batch, n, generator=gen).to(dtype).to(dev)
        p = torch.randn(batch, n, generator=gen).to(dtype).to(dev)
        t = torch.randint(0, sched.T, (batch,), generator=gen).to(dev)
        t_prev = t - 1
        key = NoiseKey.draw((batch, n), dtype, dev, generator=gen)
        steps = {
            "ddpm": lambda name: isofast.ddpm_step(x, p, t, sched, key, clip_x0=clip_x0, backend=name),
            "ddim": lambda name: isofast.ddim_step(x, p, t, t_prev, sched, eta, key, clip_x0=clip_x0, backend=name),
        }
        for what, step in steps.items():
            got, want = step(backend.name), step("reference")
            assert got.dtype == want.dtype == dtype, what
            torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol, msg=what)

    check(4, body, data_seed=st.integers(0, 2**16), batch=st.integers(1, 4), n=LENGTHS,
          eta=st.sampled_from([0.0, 1.0]), clip_x0=st.booleans())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_public_ddpm_step_takes_any_strides(backend, dtype):
    """Non-contiguous x_t, eps_pred and noise (views, channels_last) give the reference's values."""
    backend.skip_unless_takes(dtype)
    dev = backend.device
    sched = NoiseSchedule.linear(T=100, dtype=acc(dtype))

    def body(shape, seed, keyed, layout):
        g = torch.Generator().manual_seed(seed % 2**31)
        B = shape[0]
        x0 = laid_out(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(dev), layout)
        p0 = laid_out(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(dev), layout)
        t = torch.randint(0, 100, (2 * B,), generator=g).to(dev)[::2]
        z = (_key(shape, dtype, seed, 3, dev) if keyed
             else laid_out(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(dev), layout))
        got = isofast.ddpm_step(x0, p0, t, sched, z, backend=backend.name)
        want = isofast.ddpm_step(x0, p0, t, sched, z, backend="reference")
        assert got.shape == want.shape and got.dtype == want.dtype
        close(got, want, PUBLIC_TOL[dtype], extra_atol=4 * NOISE_ATOL if keyed else 0.0, msg="ddpm_step")

    check(10, body, shape=st.sampled_from([(2, 3), (3, 4, 5), (2, 3, 4, 5), (4, 2, 3, 3)]), seed=U64,
          keyed=st.booleans(), layout=st.sampled_from(LAYOUTS))


def test_public_steps_differentiable_inputs_take_the_reference(backend):
    # The fused steps have no autograd: inputs that require grad give the reference's gradients.
    dev = backend.device
    sched = NoiseSchedule.linear(T=20)
    shape, t, t_prev = (3, 2, 5), torch.tensor([0, 7, 19], device=dev), torch.tensor([-1, 3, 18], device=dev)
    key = _key(shape, torch.float32, 2**40 + 1, 9, dev)
    upstream = torch.randn(shape, device=dev)
    steps = {
        "ddpm": lambda x, ep, name: isofast.ddpm_step(x, ep, t, sched, key, backend=name),
        "ddim": lambda x, ep, name: isofast.ddim_step(x, ep, t, t_prev, sched, 0.5, key, backend=name),
    }
    for what, step in steps.items():
        grads = []
        for name in (backend.name, "reference"):
            x = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(dev).requires_grad_()
            ep = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(dev).requires_grad_()
            out = step(x, ep, name)
            (out * upstream).sum().backward()
            grads.append((out.detach(), x.grad, ep.grad))
        for got, want in zip(*grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=what)


# ---------------------------------------------------------------- CUDA against the CPU (on a GPU only)
@on("cuda")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (3, 7), (5, 8), (4, 3072), (2, 70001)])
def test_cuda_steps_equal_cpu(backend, dtype, shape):
    B, n = shape
    seed, offset = 2**41 + 5, 2**35 + 7
    T = 30
    gen = torch.Generator().manual_seed(B * n)
    x, p, e = (rand((B, n), dtype, gen) for _ in range(3))
    table, acp = _schedule(T, dtype)
    t = torch.randint(0, T, (B,), generator=gen)
    t_prev = torch.clamp(t - 3, min=-1)
    key = torch.tensor([noise.to_signed(seed), noise.to_signed(offset)])
    ops, cu = torch.ops.isofast_C, (lambda z: None if z is None else z.to(backend.device))
    for e_arg in (None, e):
        pairs = [
            (ops.ddpm_step(x, p, t, table, e_arg, key, True),
             ops.ddpm_step(cu(x), cu(p), cu(t), cu(table), cu(e_arg), cu(key), True)),
            (ops.ddim_step(x, p, t, t_prev, acp, 0.7, e_arg, key, False),
             ops.ddim_step(cu(x), cu(p), cu(t), cu(t_prev), cu(acp), 0.7, cu(e_arg), cu(key), False)),
        ]
        for want, got in pairs:
            close(got, want, PUBLIC_TOL[dtype], extra_atol=20 * NOISE_ATOL)


# ---------------------------------------------------------------- issue 14: order, precision, infinities
@pytest.mark.parametrize("name", ["fused", "reference"])
@pytest.mark.parametrize("t,t_prev", [(3, 5), (4, 4), (0, 0), (torch.tensor([5, 2]), torch.tensor([1, 2]))])
def test_public_ddim_step_refuses_a_step_forward_in_time(backend, name, t, t_prev):
    """t_prev >= t is a ValueError naming t_prev on every backend (it gave NaN on cpu/reference, a number on Triton)."""
    dev = backend.device
    sched = NoiseSchedule.linear(T=10)
    x = torch.randn(2, 3, device=dev)
    t, t_prev = (v.to(dev) if isinstance(v, torch.Tensor) else v for v in (t, t_prev))
    with pytest.raises(ValueError, match=r"t_prev must be < t .* got t_prev\[\d\] = \d >= t\[\d\] = \d"):
        isofast.ddim_step(x, x, t, t_prev, sched, 0.5, backend=backend.name if name == "fused" else "reference")


def _ddim_pairs(T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, t_prev): the last jump at t = 0, the first steps (where 1 - ab is small), 20-step strides, the end."""
    pairs = [(0, -1), (1, 0), (2, 1), (3, -1), (10, 9), (20, 0), (100, 80), (500, 480), (T - 1, T - 21), (T - 1, -1)]
    return torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_step_float32_within_a_few_ulp_of_float64(backend, eta):
    """The float32 step against the float64 step (float64 data, exact tables) in ulp of its terms' size.

    The kernels rebuilt sqrt(1 - ab) from the float32-rounded ab: ~1400 ulp of the result at t = 0
    (1 - ab = 1e-4 keeps 3 of float32's 7 digits). Now every coefficient comes from a float64 table row.
    """
    dev, T = backend.device, 1000
    sched = NoiseSchedule.linear(T)
    t, t_prev = _ddim_pairs(T)
    gen = torch.Generator().manual_seed(0)
    x, ep, z = (torch.randn(len(t), 64, generator=gen, dtype=torch.float64).float() for _ in range(3))
    got = isofast.ddim_step(x.to(dev), ep.to(dev), t.to(dev), t_prev.to(dev), sched, eta, z.to(dev),
                            backend=backend.name).cpu().double()
    exact = sched.to(dtype=torch.float64)
    want = reference.ddim_step(x.double(), ep.double(), t, t_prev, exact, eta, z.double())
    # the size of the terms: |sqrt(ab_prev) x0| + |c_eps eps| + |sigma z|, x0 = |x|/sqrt(ab) + sqrt(1/ab - 1) |eps|
    c_x0, c_eps, sigma = (c[:, None] for c in exact.ddim_coefficients(t, t_prev, eta))
    x0_size = exact.sqrt_recip_alphas_cumprod[t, None] * x.abs() + exact.sqrt_recipm1_alphas_cumprod[t, None] * ep.abs()
    size = c_x0 * x0_size + c_eps * ep.abs() + sigma * z.abs()
    ulps = ((got - want).abs() / (size * torch.finfo(torch.float32).eps)).amax(dim=1)
    assert ulps.max() <= 4, f"error in float32 ulp of the terms per (t, t_prev): {dict(zip(t.tolist(), ulps.tolist(), strict=True))}"


@on("cpu", "cuda")
def test_ddim_and_ddpm_step_float64_data_use_exact_tables(backend):
    """float64 data with a float32 schedule: the tables are the float64 masters, not float32-rounded values."""
    dev, sched = backend.device, NoiseSchedule.linear(1000)
    t, t_prev = _ddim_pairs(1000)
    gen = torch.Generator().manual_seed(1)
    x, ep, z = (torch.randn(len(t), 16, generator=gen, dtype=torch.float64) for _ in range(3))
    exact = sched.to(dtype=torch.float64)
    got = isofast.ddim_step(x.to(dev), ep.to(dev), t.to(dev), t_prev.to(dev), sched, 1.0, z.to(dev), backend=backend.name)
    torch.testing.assert_close(got.cpu(), reference.ddim_step(x, ep, t, t_prev, exact, 1.0, z), rtol=1e-13, atol=1e-13)
    got = isofast.ddpm_step(x.to(dev), ep.to(dev), t.to(dev), sched, z.to(dev), backend=backend.name)
    torch.testing.assert_close(got.cpu(), reference.ddpm_step(x, ep, t, exact, z), rtol=1e-13, atol=1e-13)


def test_reference_coefficients_come_from_the_float64_masters():
    """A float32 schedule's reference steps equal a float64 schedule's (rounded to float32 inputs), not rounded tables."""
    sched = NoiseSchedule.linear(1000)
    t, t_prev = _ddim_pairs(1000)
    x, ep, z = (torch.randn(len(t), 8, dtype=torch.float64) for _ in range(3))
    exact = sched.to(dtype=torch.float64)
    torch.testing.assert_close(reference.ddim_step(x, ep, t, t_prev, sched, 1.0, z),
                               reference.ddim_step(x, ep, t, t_prev, exact, 1.0, z), rtol=0, atol=0)
    torch.testing.assert_close(reference.ddpm_step(x, ep, t, sched, z), reference.ddpm_step(x, ep, t, exact, z),
                               rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_steps_keep_infinities_as_the_reference_does(backend, dtype):
    """±inf in x_t or eps_pred: the same inf (or NaN) on every backend; the CPU kernels used to add a
    0 * inf term the step does not have (DDIM's 0 * x, DDPM's 0 * eps) and gave NaN."""
    backend.skip_unless_takes(dtype)
    dev, sched, inf = backend.device, NoiseSchedule.linear(100, dtype=acc(dtype)), float("inf")
    x = torch.tensor([[inf, -inf, 1.0, 0.5], [2.0, 0.0, inf, 1.0], [1.0, 1.0, 1.0, 1.0]], dtype=dtype)
    ep = torch.tensor([[0.5, 1.0, -inf, 0.0], [inf, 1.0, 1.0, -inf], [1.0, inf, -inf, 0.0]], dtype=dtype)
    z = torch.zeros(3, 4, dtype=dtype).normal_(generator=torch.Generator().manual_seed(0))
    t, t_prev = torch.tensor([50, 10, 0]), torch.tensor([40, -1, -1])
    for eta in (0.0, 0.5):
        for clip in (False, True):
            got = isofast.ddim_step(x.to(dev), ep.to(dev), t.to(dev), t_prev.to(dev), sched, eta, z.to(dev),
                                    clip_x0=clip, backend=backend.name)
            want = isofast.ddim_step(x, ep, t, t_prev, sched, eta, z, clip_x0=clip, backend="reference")
            assert torch.equal(got.isinf().cpu(), want.isinf()) and torch.equal(got.isnan().cpu(), want.isnan()), \
                f"ddim eta={eta} clip={clip}: {got.cpu()} vs the reference's {want}"
            assert torch.equal(got.cpu()[want.isinf()], want[want.isinf()])
    for clip in (False, True):
        got = isofast.ddpm_step(x.to(dev), ep.to(dev), t.to(dev), sched, z.to(dev), clip_x0=clip, backend=backend.name)
        want = isofast.ddpm_step(x, ep, t, sched, z, clip_x0=clip, backend="reference")
        assert torch.equal(got.isinf().cpu(), want.isinf()) and torch.equal(got.isnan().cpu(), want.isnan()), \
            f"ddpm clip={clip}: {got.cpu()} vs the reference's {want}"
        assert torch.equal(got.cpu()[want.isinf()], want[want.isinf()])


@pytest.mark.parametrize("other", [torch.float64, torch.float16], ids=str)
def test_public_steps_refuse_eps_pred_of_another_dtype_alike_on_every_backend(backend, other):
    """x_t and eps_pred of different dtypes: TypeError naming eps_pred (was RuntimeError on cpu, ValueError on
    Triton, silently promoted by the reference)."""
    dev, sched = backend.device, NoiseSchedule.linear(10)
    x = torch.randn(2, 3, device=dev)
    for name in (backend.name, "reference"):
        with pytest.raises(TypeError, match="eps_pred must have the dtype of x_t"):
            isofast.ddpm_step(x, x.to(other), 3, sched, backend=name)
        with pytest.raises(TypeError, match="eps_pred must have the dtype of x_t"):
            isofast.ddim_step(x, x.to(other), 3, 1, sched, backend=name)
