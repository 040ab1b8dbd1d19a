"""q_sample on every fused backend, the reference beside it.

The primitive ``q_sample(x0, t, sqrt_ab, sqrt_1mab, e, seed, offset)`` (``torch.ops.isofast_C`` and
``torch.ops.isofast_triton``, one schema) against its formula, with explicit noise ``e`` (the arithmetic
alone) and with noise generated in-kernel (against the contract's normals, a few ulp apart); the CPU's
``q_sample_noise`` that also returns its draw; the ops' autograd; argument checks; then the public
``isofast.q_sample`` against ``backend="reference"``: values, gradients, dtypes, odd shapes, strides.
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
    laid_out,
    on,
    rand,
)
from hypothesis import strategies as st

import isofast
from isofast import NoiseKey, NoiseSchedule, noise
from isofast.ops import operands


def q_sample_expr(x0, t, sa, sb, eps):
    """The formula in the arithmetic dtype, rounded once to x0's dtype."""
    a = acc(x0.dtype)
    return (sa[t, None] * x0.to(a) + sb[t, None] * eps.to(a)).to(x0.dtype)


def _tables(T, dtype, gen, device):
    ab = torch.rand(T, generator=gen, dtype=torch.float64).to(acc(dtype))
    return ab.sqrt().to(device), (1 - ab).sqrt().to(device)


# ---------------------------------------------------------------- the primitive
@pytest.mark.parametrize("explicit", [False, True], ids=["keyed", "explicit"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_q_sample_equals_formula(backend, dtype, explicit):
    backend.skip_unless_takes(dtype)
    T, dev = 50, backend.device
    tol = PRIMITIVE_TOL[backend.family][dtype]
    # generated noise vs the reference's normals: the compiled generator is a few ulp off them
    extra = 0.0 if explicit else backend.pick(compiled=NOISE_ATOL, triton=0.0)

    def body(shape, seed, offset, data_seed):
        B, n = shape
        gen = torch.Generator().manual_seed(data_seed)
        sa, sb = _tables(T, dtype, gen, dev)
        t = torch.randint(0, T, (B,), generator=gen).to(dev)
        x0 = rand((B, n), dtype, gen, device=dev)
        eps = rand((B, n), dtype, gen, device=dev) if explicit else eps_of(seed, offset, B, n, dev)
        s, o = noise.to_signed(seed), noise.to_signed(offset)
        got = backend.ops.q_sample(x0, t, sa, sb, eps if explicit else None, s, o)
        assert got.dtype == dtype and got.shape == (B, n) and got.device == x0.device
        close(got, q_sample_expr(x0, t, sa, sb, eps), tol, extra_atol=extra)

    check(backend.pick(compiled=12, triton=4), body, EDGE_EXAMPLES, shape=PRIMITIVE_SHAPES[backend.family],
          seed=KEYS, offset=KEYS, data_seed=st.integers(0, 2**31))


@on("cpu", "cuda")
@pytest.mark.parametrize("n", [2047, 2048, 2049, 4099])
def test_q_sample_multi_tile_rows(backend, n):
    # Rows longer than one CPU tile (2048) with row starts that are not multiples of 4: the noise's
    # counter alignment must carry over tiles. sqrt_ab = 0, sqrt_1mab = 1: x_t is the draw itself.
    B, seed, offset = 3, 2**37 + 11, 2**34 + 3
    gen = torch.Generator().manual_seed(n)
    p = torch.randn(B, n, generator=gen).to(backend.device)
    eps = eps_of(seed, offset, B, n)
    t = torch.zeros(B, dtype=torch.int64, device=backend.device)
    zero, one = torch.zeros(1, device=backend.device), torch.ones(1, device=backend.device)
    x = backend.ops.q_sample(p, t, zero, one, None, seed, offset)
    torch.testing.assert_close(x.cpu(), eps, rtol=0, atol=NOISE_ATOL)


@on("cpu")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_q_sample_noise_returns_the_draw_it_used(backend, dtype):
    # The CPU's q_sample_noise: the x_t of the regenerating q_sample, bit for bit, and the draw itself,
    # exactly the generator's (philox_randn) in float32 (float64 for float64 data; 16-bit data unrounded).
    B, n, seed, offset = 3, 1001, 2**45 + 9, 2**36 + 1
    ops = torch.ops.isofast_C
    t = torch.tensor([0, 5, 9])
    sa, sb = torch.rand(10, dtype=acc(dtype)), torch.rand(10, dtype=acc(dtype))
    x0 = torch.randn(B, n).to(dtype)
    x_t, kept = ops.q_sample_noise(x0, t, sa, sb, seed, offset)
    assert torch.equal(x_t, ops.q_sample(x0, t, sa, sb, None, seed, offset))
    assert kept.dtype == acc(dtype) and kept.shape == (B, n)
    assert torch.equal(kept, ops.philox_randn(x0, seed, offset).reshape(B, n).to(acc(dtype)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_public_q_sample_hands_its_draw_to_the_loss(backend, dtype):
    # Where generating costs more than reading (the "cpu" backend), q_sample returns a key that carries
    # exactly one draw, the kernels' own (philox_randn); x_t is bit for bit the regenerating op's.
    # Elsewhere the key carries nothing. A key is a value: the key given is left as it was, and a
    # key of another offset carries nothing.
    backend.skip_unless_takes(dtype)
    B, n, seed, offset = 3, 1001 if backend.name != "triton" else 37, 2**45 + 9, 2**36 + 1
    sched = NoiseSchedule.linear(T=10, dtype=acc(dtype))
    dev = backend.device
    t = torch.tensor([0, 5, 9], device=dev)
    x0 = torch.randn(B, n).to(dtype).to(dev)
    given_key = NoiseKey(seed=seed, offset=offset, shape=(B, n), dtype=dtype, device=dev)
    x_t, key = isofast.q_sample(x0, t, sched, given_key, backend=backend.name)
    assert given_key.kept is None
    assert key == given_key  # the draw is no part of the key's identity
    coefs = operands.table(sched, "q_sample", x0)
    assert torch.equal(x_t, backend.ops.q_sample(x0, t, coefs[0], coefs[1], None, seed, offset))
    if not backend.keeps_draw:
        assert key.kept is None
        return
    assert key.kept is not None and key.kept.dtype == acc(dtype) and key.kept.shape == (B, n)
    assert torch.equal(key.kept, torch.ops.isofast_C.philox_randn(x0, seed, offset).reshape(B, n).to(acc(dtype)))
    # the loss reads the kept draw; a key of another offset has none to read
    assert torch.equal(operands.noise(key, x0, use_kept=True)[0], key.kept)
    other = NoiseKey(seed=seed, offset=offset + 1, shape=(B, n), dtype=dtype, device=dev)
    assert other.kept is None and operands.noise(other, x0, use_kept=True)[0] is None


# ---------------------------------------------------------------- autograd of the ops
@on("cpu", "cuda")
@pytest.mark.parametrize("with_e", [False, True], ids=["keyed", "explicit"])
def test_compiled_q_sample_op_gradcheck(backend, with_e):
    # C++ autograd (csrc/autograd.cpp): d x0 = sqrt_ab[t] g, d e = sqrt_1mab[t] g, each only when asked for
    dev, f64 = backend.device, torch.float64
    gen = torch.Generator().manual_seed(3)
    B, n, T = 3, 5, 7
    sa, sb = _tables(T, f64, gen, dev)
    t = torch.tensor([0, 6, 3], device=dev)
    x0 = rand((B, n), f64, gen, device=dev).requires_grad_()
    e = rand((B, n), f64, gen, device=dev).requires_grad_() if with_e else None
    op = torch.ops.isofast_C.q_sample
    inputs = (x0, e) if with_e else (x0,)
    assert torch.autograd.gradcheck(lambda x, *z: op(x, t, sa, sb, z[0] if z else None, 2**40, 7), inputs)
    # the same gradients as the formula's autograd
    upstream = rand((B, n), f64, gen, device=dev)
    eps = e if with_e else eps_of(2**40, 7, B, n, dev).to(f64)
    got = torch.autograd.grad((op(x0, t, sa, sb, e, 2**40, 7) * upstream).sum(), inputs)
    want = torch.autograd.grad((q_sample_expr(x0, t, sa, sb, eps) * upstream).sum(), inputs)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    if with_e:  # only e asked for: x0's gradient is not computed (and autograd takes no edge to it)
        (g_e,) = torch.autograd.grad((op(x0.detach(), t, sa, sb, e, 0, 0) * upstream).sum(), [e])
        torch.testing.assert_close(g_e, want[1], rtol=1e-12, atol=1e-12)


@on("cpu")
def test_compiled_q_sample_noise_op_gradient_in_x0(backend):
    f64 = torch.float64
    gen = torch.Generator().manual_seed(4)
    sa, sb = _tables(7, f64, gen, "cpu")
    t = torch.tensor([1, 6])
    x0 = rand((2, 9), f64, gen).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: torch.ops.isofast_C.q_sample_noise(x, t, sa, sb, 5, 6)[0], (x0,))
    x_t, kept = torch.ops.isofast_C.q_sample_noise(x0, t, sa, sb, 5, 6)
    assert x_t.requires_grad and not kept.requires_grad  # the draw is not differentiable


@on("triton")
@pytest.mark.parametrize("with_e", [False, True], ids=["keyed", "explicit"])
def test_triton_q_sample_op_gradient_equals_formula_autograd(backend, with_e):
    # torch.library.register_autograd (isofast/ops/q_sample.py), float32 (Triton computes in float32)
    dev = backend.device
    gen = torch.Generator().manual_seed(5)
    B, n, T = 3, 7, 9
    sa, sb = _tables(T, torch.float32, gen, dev)
    t = torch.tensor([0, 8, 4], device=dev)
    x0 = rand((B, n), torch.float32, gen, device=dev).requires_grad_()
    e = rand((B, n), torch.float32, gen, device=dev).requires_grad_() if with_e else None
    inputs = (x0, e) if with_e else (x0,)
    upstream = rand((B, n), torch.float32, gen, device=dev)
    eps = e if with_e else eps_of(11, 12, B, n, dev)
    got = torch.autograd.grad((backend.ops.q_sample(x0, t, sa, sb, e, 11, 12) * upstream).sum(), inputs)
    want = torch.autograd.grad((q_sample_expr(x0, t, sa, sb, eps) * upstream).sum(), inputs)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- argument checks of the ops
@on("cpu", "cuda")
def test_compiled_q_sample_bad_input_raises_clear_errors(backend):
    dev = backend.device
    x = torch.randn(3, 8, device=dev)
    t = torch.zeros(3, dtype=torch.int64, device=dev)
    tab = torch.ones(10, device=dev)
    ops = torch.ops.isofast_C
    # the regenerating op and (on the CPU) the one that also returns its draw share their checks
    calls = [lambda x0, t, a, b: ops.q_sample(x0, t, a, b, None, 0, 0)]
    if backend.name == "cpu":
        calls.append(lambda x0, t, a, b: ops.q_sample_noise(x0, t, a, b, 0, 0))
    for call in calls:
        with pytest.raises(RuntimeError, match="x0 must be float32"):
            call(x.to(torch.int32), t, tab, tab)
        with pytest.raises(RuntimeError, match="x0 must be a 2-D"):
            call(x.reshape(-1), t, tab, tab)
        with pytest.raises(RuntimeError, match="x0 must be contiguous"):
            call(torch.randn(8, 3, device=dev).t(), t, tab, tab)
        with pytest.raises(RuntimeError, match="t must be int64"):
            call(x, t.int(), tab, tab)
        with pytest.raises(RuntimeError, match=r"t\[1\] = 10 is outside"):
            call(x, torch.tensor([0, 10, 0], device=dev), tab, tab)
        with pytest.raises(RuntimeError, match="sqrt_ab must be Float"):
            call(x, t, tab.double(), tab)
    with pytest.raises(RuntimeError, match="e must have shape"):
        ops.q_sample(x, t, tab, tab, torch.randn(3, 7, device=dev), 0, 0)


@on("triton")
def test_triton_q_sample_refuses_float64_and_non_row_layouts(backend):
    dev = backend.device
    ones = torch.ones(2, device=dev)
    t = torch.zeros(2, dtype=torch.int64, device=dev)
    with pytest.raises(TypeError, match="x0"):
        backend.ops.q_sample(torch.randn(2, 5, dtype=torch.float64, device=dev), t, ones, ones, None, 0, 0)
    with pytest.raises(ValueError, match="x0"):
        backend.ops.q_sample(torch.randn(5, 2, device=dev).t(), t, ones, ones, None, 0, 0)
    with pytest.raises(ValueError, match="noise"):
        backend.ops.q_sample(torch.randn(2, 5, device=dev), t, ones, ones, torch.randn(2, 4, device=dev), 0, 0)


def test_q_sample_of_empty_rows(backend):
    x = torch.randn(2, 0, device=backend.device)
    t = torch.zeros(2, dtype=torch.int64, device=backend.device)
    ones = torch.ones(3, device=backend.device)
    assert backend.ops.q_sample(x, t, ones, ones, None, 0, 0).shape == (2, 0)
    if backend.name == "cpu":
        x_t, kept = torch.ops.isofast_C.q_sample_noise(x, t, ones, ones, 0, 0)
        assert x_t.shape == kept.shape == (2, 0)


# ---------------------------------------------------------------- the public op against the reference
def _key(shape, dtype, seed, offset, device):
    return NoiseKey(seed=seed, offset=offset, shape=shape, dtype=dtype, device=device)


def test_public_q_sample_bad_input_same_errors_as_reference(backend):
    sched = NoiseSchedule.linear(T=10)
    dev = backend.device
    x0 = torch.randn(2, 3, device=dev)
    cases = [
        lambda b: isofast.q_sample(x0.int(), torch.zeros(2, dtype=torch.int64, device=dev), sched, backend=b),
        lambda b: isofast.q_sample(x0, torch.tensor([0, 10], device=dev), sched, backend=b),
        lambda b: isofast.q_sample(x0, torch.zeros(3, dtype=torch.int64, device=dev), sched, backend=b),
    ]
    for case in cases:
        errors = []
        for name in (backend.name, "reference"):
            with pytest.raises((ValueError, TypeError)) as info:
                case(name)
            errors.append((type(info.value), str(info.value)))
        assert errors[0] == errors[1]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_public_q_sample_equals_reference(backend, dtype):
    backend.skip_unless_takes(dtype)
    dev = backend.device
    sched = NoiseSchedule.linear(T=100)

    def body(shape, seed, offset, keyed):
        x0 = torch.randn(shape, dtype=torch.float64).to(dtype).to(dev)
        t = torch.randint(0, 100, (shape[0],), device=dev)
        eps = _key(shape, dtype, seed, offset, dev) if keyed else torch.randn(shape, dtype=torch.float64).to(dtype).to(dev)
        got, _ = isofast.q_sample(x0, t, sched, eps, backend=backend.name)
        want, _ = isofast.q_sample(x0, t, sched, eps, backend="reference")
        assert got.shape == want.shape and got.dtype == want.dtype and got.device == want.device
        close(got, want, PUBLIC_TOL[dtype], extra_atol=NOISE_ATOL if keyed else 0.0)

    check(8, body, shape=IMAGE_SHAPES, seed=U64, offset=U64, keyed=st.booleans())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_public_q_sample_gradient_in_x0(backend, dtype):
    # x_t is linear in x0: the fused op's backward scales the upstream gradient by sqrt(ab_t) per sample.
    backend.skip_unless_takes(dtype)
    dev = backend.device
    sched = NoiseSchedule.linear(T=100, dtype=acc(dtype))
    shape, t = (3, 2, 5), torch.tensor([0, 41, 99], device=dev)
    key = _key(shape, dtype, 2**40 + 7, 3, dev)
    upstream = torch.randn(shape, dtype=torch.float64).to(dtype).to(dev)
    grads = []
    for name in (backend.name, "reference"):
        x0 = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype).to(dev)
        x0.requires_grad_()
        x_t, _ = isofast.q_sample(x0, t, sched, key, backend=name)
        (x_t * upstream).sum().backward()
        grads.append(x0.grad)
    assert grads[0].dtype == dtype
    close(grads[0], grads[1], PUBLIC_TOL[dtype])
    if dtype == torch.float64:
        x0 = torch.randn(shape, dtype=torch.float64, device=dev, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x: isofast.q_sample(x, t, sched, key, backend=backend.name)[0], (x0,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_public_q_sample_noise_is_the_key_the_loss_regenerates(backend, dtype):
    dev = backend.device
    sched = NoiseSchedule.linear(T=40).to(device=dev)

    def body(data_seed, batch, n):
        gen = torch.Generator().manual_seed(data_seed)
        x0 = torch.randn(batch, n, generator=gen).to(dtype).to(dev)
        t = torch.randint(0, sched.T, (batch,), generator=gen).to(dev)
        x_t, key = isofast.q_sample(x0, t, sched, backend=backend.name)
        assert isinstance(key, NoiseKey)
        sqrt_ab = sched.sqrt_alphas_cumprod.float()[t, None]
        sqrt_1mab = sched.sqrt_one_minus_alphas_cumprod.float()[t, None]
        recovered = (x_t.float() - sqrt_ab * x0.float()) / sqrt_1mab
        # x_t is rounded to its dtype once: the recovered noise carries that rounding, scaled up by 1/sqrt(1-ab)
        ulp = {torch.float32: 2e-7, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
        bound = ulp * (x_t.float().abs() + 1e-30) / sqrt_1mab + 4e-6
        eps = eps_of(key.seed, key.offset, batch, n, dev)
        # kernels use the float32 draw for every data dtype (materialize() rounds it to the key's dtype)
        assert torch.equal(key.materialize(), eps.to(dtype))
        assert ((recovered - eps).abs() <= 2 * bound).all()
        # and the loss regenerates that noise, from the key alone or from the draw it carries: its MSE
        # against the materialised tensor is at the level of the few-ulp log/sin/cos differences the
        # contract allows (a wrong draw would give about 2)
        if dtype == torch.float32:
            for k in {key, key.keeping(None)}:
                _, parts = isofast.iso_ddpm_loss(key.materialize(), k, 0.0, "sample", return_parts=True,
                                                 backend=backend.name)
                assert parts.mse.item() < (4e-6) ** 2

    check(4, body, data_seed=st.integers(0, 2**16), batch=st.integers(1, 4),
          n=LENGTHS)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_public_q_sample_takes_any_strides(backend, dtype):
    """Non-contiguous x0 and noise (views, channels_last) give the reference's values."""
    backend.skip_unless_takes(dtype)
    dev = backend.device
    sched = NoiseSchedule.linear(T=100, dtype=acc(dtype))

    def body(shape, seed, keyed, layout):
        g = torch.Generator().manual_seed(seed % 2**31)
        B = shape[0]
        x0 = laid_out(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(dev), layout)
        t = torch.randint(0, 100, (2 * B,), generator=g).to(dev)[::2]
        eps = (_key(shape, dtype, seed, 3, dev) if keyed
               else laid_out(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(dev), layout))
        got, _ = isofast.q_sample(x0, t, sched, eps, backend=backend.name)
        want, _ = isofast.q_sample(x0, t, sched, eps, backend="reference")
        assert got.shape == want.shape and got.dtype == want.dtype
        close(got, want, PUBLIC_TOL[dtype], extra_atol=4 * NOISE_ATOL if keyed else 0.0, msg="x_t")

    check(10, body, shape=st.sampled_from([(2, 3), (3, 4, 5), (2, 3, 4, 5), (4, 2, 3, 3)]), seed=U64,
          keyed=st.booleans(), layout=st.sampled_from(LAYOUTS))


# ---------------------------------------------------------------- CUDA against the CPU (on a GPU only)
@on("cuda")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (3, 7), (5, 8), (4, 3072), (2, 70001)])
def test_cuda_q_sample_equals_cpu(backend, dtype, shape):
    B, n = shape
    seed, offset = 2**41 + 5, 2**35 + 7
    T = 30
    gen = torch.Generator().manual_seed(B * n)
    x, e = rand((B, n), dtype, gen), rand((B, n), dtype, gen)
    ab = torch.rand(T, generator=gen, dtype=torch.float64).to(acc(dtype))
    t = torch.randint(0, T, (B,), generator=gen)
    s, o = noise.to_signed(seed), noise.to_signed(offset)
    ops, cu = torch.ops.isofast_C, (lambda z: None if z is None else z.to(backend.device))
    for e_arg in (None, e):
        want = ops.q_sample(x, t, ab.sqrt(), (1 - ab).sqrt(), e_arg, s, o)
        got = ops.q_sample(cu(x), cu(t), cu(ab.sqrt()), cu((1 - ab).sqrt()), cu(e_arg), s, o)
        close(got, want, PUBLIC_TOL[dtype], extra_atol=20 * NOISE_ATOL)

