"""The compiled kernels (isofast._C, backend "cpu") against plain-torch expressions of the
kernel-primitive contract (isofast/ops/backends.py), and the public ops through backend="cpu"
against backend="reference".

Each primitive is checked twice: with explicit noise ``e`` (the arithmetic alone, tight
tolerances) and with in-kernel noise (compared with the contract's normals from
``isofast.noise.randn_contract``; they differ from the kernel's by a few ulp).
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from isofast import noise

compiled = pytest.importorskip("isofast.ops.compiled")
if compiled._C is None:
    pytest.skip(compiled._IMPORT_ERROR, allow_module_level=True)

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# (rtol, atol) of an output in the data dtype; float64 only sees the float32 noise's few ulp.
TOL = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-2),
    torch.float16: (2e-3, 2e-3),
}
NOISE_ATOL = 4e-6  # generated vs reference normals (ARCHITECTURE.md, noise contract step 3)
U64 = st.integers(0, 2**64 - 1)
SHAPES = st.tuples(st.integers(1, 5), st.sampled_from([1, 2, 3, 4, 5, 7, 8, 31, 64, 97, 300]))


def acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def eps_of(seed: int, offset: int, B: int, n: int) -> torch.Tensor:
    return noise.randn_contract(seed, offset, B * n).reshape(B, n)


def rand(B: int, n: int, dtype: torch.dtype, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(B, n, generator=gen, dtype=torch.float64) * scale).to(dtype)


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, extra_atol: float = 0.0) -> None:
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(got.to(torch.float64), want.to(torch.float64), rtol=rtol, atol=atol + extra_atol)


# ---------------------------------------------------------------- q_sample
def q_sample_expr(x0, t, sa, sb, eps):
    a = acc(x0.dtype)
    return (sa[t, None] * x0.to(a) + sb[t, None] * eps.to(a)).to(x0.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=12, deadline=None)
@given(shape=SHAPES, seed=U64, offset=U64, data_seed=st.integers(0, 2**31))
def test_q_sample_matches_contract(dtype, shape, seed, offset, data_seed):
    B, n = shape
    gen = torch.Generator().manual_seed(data_seed)
    T = 50
    ab = torch.rand(T, generator=gen, dtype=torch.float64).to(acc(dtype))
    sa, sb = ab.sqrt(), (1 - ab).sqrt()
    t = torch.randint(0, T, (B,), generator=gen)
    x0 = rand(B, n, dtype, gen)
    e = rand(B, n, dtype, gen)
    got = compiled.q_sample(x0, t, sa, sb, e, 0, 0)
    assert got.dtype == dtype and got.shape == (B, n)
    close(got, q_sample_expr(x0, t, sa, sb, e), dtype)
    s, o = noise.to_signed(seed), noise.to_signed(offset)
    got = compiled.q_sample(x0, t, sa, sb, None, s, o)
    close(got, q_sample_expr(x0, t, sa, sb, eps_of(seed, offset, B, n)), dtype, extra_atol=NOISE_ATOL)


# ---------------------------------------------------------------- iso_sums / iso_grad
def sums_expr(p, eps):
    a = acc(p.dtype)
    p, eps = p.to(a), eps.to(a)
    return ((p - eps) ** 2).sum(1), (p**2).sum(1)


def grad_expr(p, eps, c1, c2):
    a = acc(p.dtype)
    pa = p.to(a)
    return (c1[:, None] * (pa - eps.to(a)) + c2[:, None] * pa).to(p.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=12, deadline=None)
@given(shape=SHAPES, seed=U64, offset=U64, data_seed=st.integers(0, 2**31))
def test_iso_sums_and_grad_match_contract(dtype, shape, seed, offset, data_seed):
    B, n = shape
    gen = torch.Generator().manual_seed(data_seed)
    p = rand(B, n, dtype, gen, scale=1.3)
    e = rand(B, n, dtype, gen)
    c1 = torch.randn(B, generator=gen, dtype=torch.float64).to(acc(dtype))
    c2 = torch.randn(B, generator=gen, dtype=torch.float64).to(acc(dtype))
    # sums are accumulated in the arithmetic type: compare relative to the float32/64 sums
    sum_tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-6, atol=1e-5)
    s, o = noise.to_signed(seed), noise.to_signed(offset)
    for e_arg, eps, extra in ((e, e, 0.0), (None, eps_of(seed, offset, B, n), NOISE_ATOL)):
        sse, ssq = compiled.iso_sums(p, e_arg, s, o)
        want_sse, want_ssq = sums_expr(p, eps)
        assert sse.dtype == acc(dtype) and sse.shape == (B,)
        err = 2 * extra * (p.to(torch.float64) - eps.to(torch.float64)).abs().sum(1) + extra
        torch.testing.assert_close(sse.double(), want_sse.double(), **{**sum_tol, "atol": sum_tol["atol"] + err.max().item()})
        torch.testing.assert_close(ssq.double(), want_ssq.double(), **sum_tol)
        g = compiled.iso_grad(p, e_arg, s, o, c1, c2)
        assert g.dtype == dtype and g.shape == (B, n)
        close(g, grad_expr(p, eps, c1, c2), dtype, extra_atol=extra * c1.abs().max().item())


@pytest.mark.parametrize("n", [2047, 2048, 2049, 4099])
def test_iso_sums_multi_tile_rows(n):
    # Rows longer than one tile (2048) with row starts that are not multiples of 4: the tile
    # partials and the noise's counter alignment must add up.
    B, seed, offset = 3, 2**37 + 11, 2**34 + 3
    gen = torch.Generator().manual_seed(n)
    p = torch.randn(B, n, generator=gen)
    eps = eps_of(seed, offset, B, n)
    sse, ssq = compiled.iso_sums(p, None, seed, offset)
    want_sse, want_ssq = sums_expr(p.double(), eps.double())
    torch.testing.assert_close(sse.double(), want_sse, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(ssq.double(), want_ssq, rtol=1e-5, atol=1e-3)
    g = compiled.iso_grad(p, None, seed, offset, torch.ones(B), torch.zeros(B))
    torch.testing.assert_close(g, p - eps, rtol=0, atol=NOISE_ATOL)
    x = compiled.q_sample(p, torch.zeros(B, dtype=torch.int64), torch.zeros(1), torch.ones(1), None, seed, offset)
    torch.testing.assert_close(x, eps, rtol=0, atol=NOISE_ATOL)


@pytest.mark.parametrize("B,n", [(3000, 2), (1400, 3), (50, 301), (9, 1023)])
def test_short_rows_packed_several_per_tile(B, n):
    # Rows shorter than half a tile are packed several per tile with one noise fill per tile; tiles
    # after the first start mid-stream (flat index not a multiple of 4 for odd n).
    seed, offset = 2**40 + 5, 2**33 + 1
    gen = torch.Generator().manual_seed(B * n)
    p = torch.randn(B, n, generator=gen)
    eps = eps_of(seed, offset, B, n)
    sse, ssq = compiled.iso_sums(p, None, seed, offset)
    want_sse, want_ssq = sums_expr(p.double(), eps.double())
    torch.testing.assert_close(sse.double(), want_sse, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ssq.double(), want_ssq, rtol=1e-5, atol=1e-4)
    g = compiled.iso_grad(p, None, seed, offset, torch.ones(B), torch.zeros(B))
    torch.testing.assert_close(g, p - eps, rtol=0, atol=NOISE_ATOL)
    t = torch.randint(0, 10, (B,), generator=gen)
    t[::7] = 0  # rows with no noise (t = 0) beside rows with noise in the same tile
    table = torch.rand(5, 10, generator=gen, dtype=torch.float32) + 0.1
    key = torch.tensor([noise.to_signed(seed), noise.to_signed(offset)])
    out = compiled.ddpm_step(p, p * 0.5, t, table, None, key, False)
    torch.testing.assert_close(out, ddpm_expr(p, p * 0.5, t, table, eps, False), rtol=1e-5, atol=1e-5)


def test_noise_is_regenerated_identically():
    # q_sample, iso_sums and iso_grad see bit-identical eps: with x0 = 0, sqrt_1mab = 1 the
    # q_sample output *is* eps, and iso_grad with c1 = -1, c2 = 1 returns eps too.
    B, n, seed, offset = 4, 333, 99, 2**40
    t = torch.zeros(B, dtype=torch.int64)
    eps_q = compiled.q_sample(torch.zeros(B, n), t, torch.zeros(1), torch.ones(1), None, seed, offset)
    eps_g = compiled.iso_grad(torch.zeros(B, n), None, seed, offset, -torch.ones(B), torch.ones(B))
    assert torch.equal(eps_q, eps_g)
    sse, _ = compiled.iso_sums(eps_q, None, seed, offset)
    assert torch.equal(sse, torch.zeros(B))


@pytest.mark.parametrize("dtype", DTYPES)
def test_materialised_eps_gives_the_regenerated_numbers(dtype):
    # CPU q_sample (or iso_sums, on a key q_sample did not keep) keeps the eps it drew for
    # iso_sums/iso_grad (compiled.py): bit-identical results to regenerating it in the kernels,
    # and the kept eps is exactly the kernel generator's draw, in float32 (float64 for float64).
    B, n, seed, offset = 3, 1001, 2**45 + 9, 2**36 + 1
    t = torch.tensor([0, 5, 9])
    sa, sb = torch.rand(10, dtype=acc(dtype)), torch.rand(10, dtype=acc(dtype))
    x0, p = torch.randn(B, n).to(dtype), torch.randn(B, n).to(dtype)
    c1, c2 = torch.randn(B, dtype=acc(dtype)), torch.randn(B, dtype=acc(dtype))
    ops = torch.ops.isofast_C
    regen = (ops.iso_sums(p, None, seed, offset), ops.iso_grad(p, None, seed, offset, c1, c2))
    regen_x_t = ops.q_sample(x0, t, sa, sb, None, seed, offset)
    compiled.clear_noise_cache()
    alone = (compiled.iso_sums(p, None, seed, offset), compiled.iso_grad(p, None, seed, offset, c1, c2))
    assert len(compiled._eps_cache) == 1  # the loss on its own drew and kept it once
    assert torch.equal(regen[0][0], alone[0][0]) and torch.equal(regen[0][1], alone[0][1])
    assert torch.equal(regen[1], alone[1])
    compiled.clear_noise_cache()
    x_t = compiled.q_sample(x0, t, sa, sb, None, seed, offset)
    assert torch.equal(x_t, regen_x_t)
    assert len(compiled._eps_cache) == 1
    kept = compiled._cached_eps(p, None, seed, offset)
    assert torch.equal(kept, torch.ops.isofast_C.philox_randn(x0, seed, offset).reshape(B, n).to(acc(dtype)))
    stored = (compiled.iso_sums(p, None, seed, offset), compiled.iso_grad(p, None, seed, offset, c1, c2))
    assert torch.equal(regen[0][0], stored[0][0]) and torch.equal(regen[0][1], stored[0][1])
    assert torch.equal(regen[1], stored[1])
    # another key never sees this draw
    assert compiled._cached_eps(p, None, seed, offset + 1) is None
    compiled.clear_noise_cache()


@pytest.mark.parametrize("loss_dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_a_draw_kept_for_float32_data_serves_a_loss_of_another_dtype(loss_dtype):
    # Mixed precision: float32 x0 through q_sample, eps_pred in bf16 (autocast) or float64. The loss
    # reads the float32 draw (converted exactly) and equals the regenerating kernels bit for bit.
    B, n, seed, offset = 4, 777, 2**50 + 3, 11
    t = torch.tensor([1, 2, 3, 4])
    x0 = torch.randn(B, n)
    p = torch.randn(B, n).to(loss_dtype)
    c1, c2 = torch.randn(B, dtype=acc(loss_dtype)), torch.randn(B, dtype=acc(loss_dtype))
    ops = torch.ops.isofast_C
    compiled.clear_noise_cache()
    compiled.q_sample(x0, t, torch.rand(10), torch.rand(10), None, seed, offset)
    assert len(compiled._eps_cache) == 1
    got = (compiled.iso_sums(p, None, seed, offset), compiled.iso_grad(p, None, seed, offset, c1, c2))
    assert len(compiled._eps_cache) == 1  # served from the kept draw, nothing new drawn
    want = (ops.iso_sums(p, None, seed, offset), ops.iso_grad(p, None, seed, offset, c1, c2))
    assert torch.equal(got[0][0], want[0][0]) and torch.equal(got[0][1], want[0][1])
    assert torch.equal(got[1], want[1])
    compiled.clear_noise_cache()


def test_float32_noise_beside_16bit_data_is_checked():
    p = torch.randn(3, 8).to(torch.bfloat16)
    ops = torch.ops.isofast_C
    with pytest.raises(RuntimeError, match="e must have shape"):
        ops.iso_sums(p, torch.randn(3, 7), 0, 0)
    with pytest.raises(RuntimeError, match="e must have dtype"):
        ops.iso_sums(p, torch.randn(3, 8, dtype=torch.float64), 0, 0)
    with pytest.raises(RuntimeError, match="e must have dtype"):
        ops.iso_sums(torch.randn(3, 8), torch.randn(3, 8).to(torch.bfloat16), 0, 0)
    with pytest.raises(RuntimeError, match="e must be contiguous"):
        ops.iso_grad(p, torch.randn(8, 3).t(), 0, 0, torch.ones(3), torch.ones(3))


# ---------------------------------------------------------------- sampler steps
def ddpm_expr(x, ep, t, table, z, clip):
    a = acc(x.dtype)
    xa, ea = x.to(a), ep.to(a)
    x0 = table[0, t, None] * xa - table[1, t, None] * ea
    if clip:
        x0 = x0.clamp(-1, 1)
    nz = (t > 0).to(a)[:, None]
    return (table[2, t, None] * x0 + table[3, t, None] * xa + nz * table[4, t, None] * z.to(a)).to(x.dtype)


def ddim_expr(x, ep, t, t_prev, acp, eta, z, clip):
    a = acc(x.dtype)
    xa, ea = x.to(a), ep.to(a)
    ab = acp[t]
    ab_prev = torch.where(t_prev >= 0, acp[t_prev.clamp_min(0)], torch.ones_like(ab))
    x0 = (xa - (1 - ab).sqrt()[:, None] * ea) / ab.sqrt()[:, None]
    if clip:
        x0 = x0.clamp(-1, 1)
    sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()
    c_eps = (1 - ab_prev - sigma**2).clamp_min(0).sqrt()
    return (ab_prev.sqrt()[:, None] * x0 + c_eps[:, None] * ea + sigma[:, None] * z.to(a)).to(x.dtype)


def _schedule(T: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    betas = torch.linspace(1e-4, 0.2, T, dtype=torch.float64)
    alphas = 1 - betas
    acp = alphas.cumprod(0)
    acp_prev = torch.cat([torch.ones(1, dtype=torch.float64), acp[:-1]])
    post_var = betas * (1 - acp_prev) / (1 - acp)
    table = torch.stack([
        acp.rsqrt(), (1 / acp - 1).sqrt(), betas * acp_prev.sqrt() / (1 - acp),
        (1 - acp_prev) * alphas.sqrt() / (1 - acp), post_var.sqrt(),
    ])
    return table.to(acc(dtype)).contiguous(), acp.to(acc(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=10, deadline=None)
@given(shape=SHAPES, seed=U64, offset=U64, data_seed=st.integers(0, 2**31), clip=st.booleans(),
       eta=st.sampled_from([0.0, 0.5, 1.0]))
def test_steps_match_contract(dtype, shape, seed, offset, data_seed, clip, eta):
    B, n = shape
    T = 20
    gen = torch.Generator().manual_seed(data_seed)
    table, acp = _schedule(T, dtype)
    t = torch.randint(0, T, (B,), generator=gen)
    t[0] = 0  # the t = 0 row adds no noise
    t_prev = torch.clamp(t - torch.randint(1, 5, (B,), generator=gen), min=-1)
    x = rand(B, n, dtype, gen)
    ep = rand(B, n, dtype, gen)
    e = rand(B, n, dtype, gen)
    key = torch.tensor([noise.to_signed(seed), noise.to_signed(offset)])
    z = eps_of(seed, offset, B, n)
    # the step coefficients reach ~1/sqrt(ab_T) ~ 5: scale the tolerance of the noise term with them
    for e_arg, zz, extra in ((e, e, 0.0), (None, z, 3 * NOISE_ATOL)):
        got = compiled.ddpm_step(x, ep, t, table, e_arg, key, clip)
        assert got.dtype == dtype and got.shape == (B, n)
        close(got, ddpm_expr(x, ep, t, table, zz, clip), dtype, extra_atol=extra)
        got = compiled.ddim_step(x, ep, t, t_prev, acp, eta, e_arg, key, clip)
        rel = {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 0.0)  # (1-ab)/sqrt(ab) vs the reference's order
        close(got, ddim_expr(x, ep, t, t_prev, acp, eta, zz, clip), dtype, extra_atol=extra + rel)


def test_ddim_eta_zero_ignores_key():
    B, n = 2, 10
    table, acp = _schedule(10, torch.float32)
    x, ep = torch.randn(B, n), torch.randn(B, n)
    t, t_prev = torch.tensor([5, 3]), torch.tensor([2, -1])
    a = compiled.ddim_step(x, ep, t, t_prev, acp, 0.0, None, torch.tensor([1, 2]), False)
    b = compiled.ddim_step(x, ep, t, t_prev, acp, 0.0, None, torch.tensor([3, 4]), False)
    assert torch.equal(a, b)


# ---------------------------------------------------------------- bad input
def test_bad_input_raises_clear_errors():
    x = torch.randn(3, 8)
    t = torch.zeros(3, dtype=torch.int64)
    tab = torch.ones(10)
    with pytest.raises(RuntimeError, match="x0 must be float32"):
        compiled.q_sample(x.to(torch.int32), t, tab, tab, None, 0, 0)
    with pytest.raises(RuntimeError, match="x0 must be a 2-D"):
        compiled.q_sample(x.reshape(-1), t, tab, tab, None, 0, 0)
    with pytest.raises(RuntimeError, match="x0 must be contiguous"):
        compiled.q_sample(torch.randn(8, 3).t(), t, tab, tab, None, 0, 0)
    with pytest.raises(RuntimeError, match="t must be int64"):
        compiled.q_sample(x, t.int(), tab, tab, None, 0, 0)
    with pytest.raises(RuntimeError, match=r"t\[1\] = 10 is outside"):
        compiled.q_sample(x, torch.tensor([0, 10, 0]), tab, tab, None, 0, 0)
    with pytest.raises(RuntimeError, match="sqrt_ab must be Float"):
        compiled.q_sample(x, t, tab.double(), tab, None, 0, 0)
    with pytest.raises(RuntimeError, match="e must have shape"):
        compiled.q_sample(x, t, tab, tab, torch.randn(3, 7), 0, 0)
    with pytest.raises(RuntimeError, match="e must have dtype"):
        compiled.iso_sums(x, x.double(), 0, 0)
    with pytest.raises(RuntimeError, match="c1 and c2 must have shape"):
        compiled.iso_grad(x, None, 0, 0, torch.ones(2), torch.ones(3))
    with pytest.raises(RuntimeError, match="key must be"):
        compiled.ddpm_step(x, x, t, torch.ones(5, 10), None, torch.tensor([1, 2, 3]), False)
    with pytest.raises(RuntimeError, match="key .* is required when e is None"):
        compiled.ddpm_step(x, x, t, torch.ones(5, 10), None, None, False)
    with pytest.raises(RuntimeError, match="table must have shape"):
        compiled.ddpm_step(x, x, t, torch.ones(4, 10), None, torch.tensor([1, 2]), False)
    with pytest.raises(RuntimeError, match=r"t_prev\[0\] = -2"):
        compiled.ddim_step(x, x, t, t - 2, tab, 0.0, None, torch.tensor([1, 2]), False)


def test_empty_inputs():
    x = torch.randn(2, 0)
    t = torch.zeros(2, dtype=torch.int64)
    assert compiled.q_sample(x, t, torch.ones(3), torch.ones(3), None, 0, 0).shape == (2, 0)
    sse, ssq = compiled.iso_sums(x, None, 0, 0)
    assert torch.equal(sse, torch.zeros(2)) and torch.equal(ssq, torch.zeros(2))


def test_available_reports_cpu():
    ok, reason = compiled.available("cpu")
    assert ok, reason
    ok, reason = compiled.available("cuda")
    if not torch.cuda.is_available():
        assert not ok and reason


def test_results_do_not_depend_on_thread_count():
    B, n, seed = 3, 5000, 2**50
    p = torch.randn(B, n)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = compiled.iso_sums(p, None, seed, 0)
        torch.set_num_threads(max(2, before))
        many = compiled.iso_sums(p, None, seed, 0)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])
    assert math.isfinite(one[0].sum().item())


# ---------------------------------------------------------------- public ops: backend "cpu" vs "reference"
import isofast  # noqa: E402
from isofast import NoiseKey, NoiseSchedule  # noqa: E402

LOSS_TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-6), torch.bfloat16: (1e-2, 1e-2),
            torch.float16: (2e-3, 2e-3)}
IMAGE_SHAPES = st.sampled_from([(1, 1), (2, 2), (3, 5), (1, 3, 4, 4), (4, 3, 5, 3), (2, 7, 3)])


def _key(shape, dtype, seed, offset):
    return NoiseKey(seed=seed, offset=offset, shape=shape, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=8, deadline=None)
@given(shape=IMAGE_SHAPES, seed=U64, offset=U64, keyed=st.booleans())
def test_public_q_sample_cpu_equals_reference(dtype, shape, seed, offset, keyed):
    sched = NoiseSchedule.linear(T=100)
    x0 = torch.randn(shape, dtype=torch.float64).to(dtype)
    t = torch.randint(0, 100, (shape[0],))
    noise = _key(shape, dtype, seed, offset) if keyed else torch.randn(shape, dtype=torch.float64).to(dtype)
    got, _ = isofast.q_sample(x0, t, sched, noise, backend="cpu")
    want, _ = isofast.q_sample(x0, t, sched, noise, backend="reference")
    assert got.shape == want.shape and got.dtype == want.dtype
    close(got, want, dtype, extra_atol=NOISE_ATOL if keyed else 0.0)


@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=8, deadline=None)
@given(shape=IMAGE_SHAPES, seed=U64, keyed=st.booleans(), mode=st.sampled_from(["batch", "sample"]),
       reduction=st.sampled_from(["mean", "sum", "none"]), weighted=st.booleans(), lam=st.sampled_from([0.0, 0.3, 2.0]))
def test_public_loss_cpu_equals_reference_forward_backward(dtype, shape, seed, keyed, mode, reduction, weighted, lam):
    if mode == "batch" and reduction == "none":
        reduction = "mean"
    B = shape[0]
    noise = _key(shape, dtype, seed, 0) if keyed else torch.randn(shape, dtype=torch.float64).to(dtype)
    weights = torch.rand(B, dtype=acc(dtype)) + 0.5 if weighted else None
    results = []
    for backend in ("cpu", "reference"):
        p = (torch.randn(shape, generator=torch.Generator().manual_seed(seed % 2**31), dtype=torch.float64) * 1.2)
        p = p.to(dtype).requires_grad_()
        loss, parts = isofast.iso_ddpm_loss(p, noise, lam, mode, weights, reduction, return_parts=True, backend=backend)
        loss.sum().backward()
        results.append((loss.detach(), parts, p.grad))
    (l_cpu, parts_cpu, g_cpu), (l_ref, parts_ref, g_ref) = results
    rtol, atol = LOSS_TOL[dtype]
    extra = 4 * NOISE_ATOL if keyed else 0.0
    torch.testing.assert_close(l_cpu, l_ref, rtol=rtol, atol=atol + extra)
    for a, b in zip(parts_cpu, parts_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol + extra)
    assert g_cpu.dtype == dtype and g_cpu.shape == shape
    close(g_cpu, g_ref, dtype, extra_atol=extra)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_public_q_sample_cpu_gradient_in_x0(dtype):
    # x_t is linear in x0: the fused op's backward scales the upstream gradient by sqrt(ab_t) per sample.
    sched = NoiseSchedule.linear(T=100, dtype=acc(dtype))
    shape, t = (3, 2, 5), torch.tensor([0, 41, 99])
    key = _key(shape, dtype, 2**40 + 7, 3)
    upstream = torch.randn(shape, dtype=torch.float64).to(dtype)
    grads = []
    for backend in ("cpu", "reference"):
        x0 = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
        x0.requires_grad_()
        x_t, _ = isofast.q_sample(x0, t, sched, key, backend=backend)
        (x_t * upstream).sum().backward()
        grads.append(x0.grad)
    assert grads[0].dtype == dtype
    close(grads[0], grads[1], dtype)
    if dtype == torch.float64:
        x0 = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x: isofast.q_sample(x, t, sched, key, backend="cpu")[0], (x0,))


def test_public_loss_gradcheck_float64_cpu():
    shape = (3, 2, 5)
    key = _key(shape, torch.float64, 2**40 + 1, 2**33)
    w = torch.rand(3, dtype=torch.float64) + 0.5
    p = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    for mode, reduction in (("batch", "mean"), ("sample", "sum"), ("sample", "none")):
        def f(x, mode=mode, reduction=reduction):
            return isofast.iso_ddpm_loss(x, key, 0.7, mode, w, reduction, backend="cpu")
        assert torch.autograd.gradcheck(f, (p,))


@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=6, deadline=None)
@given(shape=IMAGE_SHAPES, seed=U64, keyed=st.booleans(), clip=st.booleans(), eta=st.sampled_from([0.0, 1.0]),
       variance=st.sampled_from(["fixed_small", "fixed_large"]))
def test_public_steps_cpu_equal_reference(dtype, shape, seed, keyed, clip, eta, variance):
    sched = NoiseSchedule.cosine(T=50, dtype=acc(dtype))  # float64 data: tables built in float64 on both sides
    B = shape[0]
    x = torch.randn(shape, dtype=torch.float64).to(dtype)
    ep = torch.randn(shape, dtype=torch.float64).to(dtype)
    t = torch.randint(0, 50, (B,))
    t_prev = torch.clamp(t - 7, min=-1)
    noise = _key(shape, dtype, seed, 5) if keyed else torch.randn(shape, dtype=torch.float64).to(dtype)
    # cosine schedule: 1/sqrt(ab) reaches ~1e2 near T, so compare relative to the coefficients' size
    scale = float(sched.sqrt_recip_alphas_cumprod.max())
    extra = (NOISE_ATOL * 2 if keyed else 0.0) + {torch.float64: 1e-12, torch.float32: 2e-6}.get(dtype, 0.0) * scale
    got = isofast.ddpm_step(x, ep, t, sched, noise, clip_x0=clip, variance=variance, backend="cpu")
    want = isofast.ddpm_step(x, ep, t, sched, noise, clip_x0=clip, variance=variance, backend="reference")
    close(got, want, dtype, extra_atol=extra)
    got = isofast.ddim_step(x, ep, t, t_prev, sched, eta, noise, clip_x0=clip, backend="cpu")
    want = isofast.ddim_step(x, ep, t, t_prev, sched, eta, noise, clip_x0=clip, backend="reference")
    close(got, want, dtype, extra_atol=extra)


LAYOUTS = ["contiguous", "transposed", "strided", "channels_last", "batch_stride"]


def _laid_out(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x's values in a tensor with other strides (the kernels need row-major (B, n): ops must copy)."""
    if layout == "transposed" and x.ndim >= 2:
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "strided":  # every other element of a wider buffer
        big = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
        big[..., ::2] = x
        return big[..., ::2]
    if layout == "channels_last" and x.ndim == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "batch_stride":  # every other sample of a larger batch
        big = torch.zeros(2 * x.shape[0], *x.shape[1:], dtype=x.dtype)
        big[::2] = x
        return big[::2]
    return x


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@settings(max_examples=10, deadline=None)
@given(shape=st.sampled_from([(2, 3), (3, 4, 5), (2, 3, 4, 5), (4, 2, 3, 3)]), seed=U64, keyed=st.booleans(),
       layout=st.sampled_from(LAYOUTS), mode=st.sampled_from(["batch", "sample"]), weighted=st.booleans())
def test_public_ops_cpu_take_any_strides(dtype, shape, seed, keyed, layout, mode, weighted):
    """Non-contiguous inputs (views, channels_last, strided weights) give the reference's values and grads."""
    g = torch.Generator().manual_seed(seed % 2**31)
    sched = NoiseSchedule.linear(T=100, dtype=acc(dtype))
    B = shape[0]
    x0 = _laid_out(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype), layout)
    p0 = _laid_out(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype), layout)
    t = torch.randint(0, 100, (2 * B,), generator=g)[::2]
    w = (torch.rand(2 * B, generator=g, dtype=torch.float64) + 0.5).to(acc(dtype))[::2] if weighted else None
    noise = _key(shape, dtype, seed, 3) if keyed else _laid_out(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype), layout)
    extra = 4 * NOISE_ATOL if keyed else 0.0
    results = {}
    for backend in ("cpu", "reference"):
        x_t, _ = isofast.q_sample(x0, t, sched, noise, backend=backend)
        p = p0.detach().clone().requires_grad_()  # clone keeps the layout (preserve_format)
        loss = isofast.iso_ddpm_loss(p, noise, 0.3, mode, w, backend=backend)
        loss.backward()
        step = isofast.ddpm_step(x0, p0, t, sched, noise, backend=backend)
        results[backend] = (x_t, loss.detach(), p.grad, step)
    for name, got, want in zip(("x_t", "loss", "grad", "ddpm_step"), results["cpu"], results["reference"], strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype, name
        close(got, want, dtype if name != "loss" else acc(dtype), extra_atol=extra + (1e-6 if name == "loss" else 0.0))


def test_public_bad_input_same_errors_as_reference():
    sched = NoiseSchedule.linear(T=10)
    x0 = torch.randn(2, 3)
    cases = [
        lambda b: isofast.q_sample(x0.int(), torch.zeros(2, dtype=torch.int64), sched, backend=b),
        lambda b: isofast.q_sample(x0, torch.tensor([0, 10]), sched, backend=b),
        lambda b: isofast.q_sample(x0, torch.zeros(3, dtype=torch.int64), sched, backend=b),
        lambda b: isofast.iso_ddpm_loss(x0, torch.randn(2, 4), backend=b),
        lambda b: isofast.iso_ddpm_loss(x0, torch.randn(2, 3), iso_mode="bogus", backend=b),
        lambda b: isofast.ddpm_step(x0, x0[:1], torch.zeros(2, dtype=torch.int64), sched, backend=b),
    ]
    for case in cases:
        errors = []
        for backend in ("cpu", "reference"):
            with pytest.raises((ValueError, TypeError)) as info:
                case(backend)
            errors.append((type(info.value), str(info.value)))
        assert errors[0] == errors[1]


def test_torch_compile_fullgraph_cpu_loss_equals_eager():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.SiLU(), torch.nn.Linear(16, 6))
    sched = NoiseSchedule.linear(T=100)
    x0 = torch.randn(4, 6)
    t = torch.randint(0, 100, (4,))
    key = NoiseKey(seed=1234, offset=77, shape=(4, 6))

    def step(x0, t):
        x_t, noise = isofast.q_sample(x0, t, sched, key, backend="cpu")
        return isofast.iso_ddpm_loss(model(x_t), noise, 0.3, backend="cpu")

    eager = step(x0, t)
    eager.backward()
    grads_eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch._dynamo.reset()
    compiled_step = torch.compile(step, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break raises
    loss = compiled_step(x0, t)
    loss.backward()
    torch.testing.assert_close(loss, eager, rtol=1e-6, atol=1e-7)
    for g, ge in zip([p.grad for p in model.parameters()], grads_eager, strict=True):
        torch.testing.assert_close(g, ge, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- CUDA kernels (on a GPU only)
needs_cuda_kernels = pytest.mark.skipif(
    not compiled.available("cuda")[0], reason=f"CUDA kernels not usable here: {compiled.available('cuda')[1]}"
)


@needs_cuda_kernels
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (3, 7), (5, 8), (4, 3072), (2, 70001)])
def test_cuda_primitives_equal_cpu(dtype, shape):
    B, n = shape
    seed, offset = 2**41 + 5, 2**35 + 7
    dev = torch.device("cuda")
    T = 30
    gen = torch.Generator().manual_seed(B * n)
    x, p, e = (rand(B, n, dtype, gen) for _ in range(3))
    table, acp = _schedule(T, dtype)
    ab = torch.rand(T, generator=gen, dtype=torch.float64).to(acc(dtype))
    t = torch.randint(0, T, (B,), generator=gen)
    t_prev = torch.clamp(t - 3, min=-1)
    c1, c2 = (torch.randn(B, generator=gen, dtype=torch.float64).to(acc(dtype)) for _ in range(2))
    key = torch.tensor([noise.to_signed(seed), noise.to_signed(offset)])
    s, o = key.tolist()
    cu = lambda z: None if z is None else z.to(dev)  # noqa: E731
    for e_arg in (None, e):
        pairs = [
            (compiled.q_sample(x, t, ab.sqrt(), (1 - ab).sqrt(), e_arg, s, o),
             compiled.q_sample(cu(x), cu(t), cu(ab.sqrt()), cu((1 - ab).sqrt()), cu(e_arg), s, o)),
            (compiled.iso_grad(p, e_arg, s, o, c1, c2), compiled.iso_grad(cu(p), cu(e_arg), s, o, cu(c1), cu(c2))),
            (compiled.ddpm_step(x, p, t, table, e_arg, key, True),
             compiled.ddpm_step(cu(x), cu(p), cu(t), cu(table), cu(e_arg), cu(key), True)),
            (compiled.ddim_step(x, p, t, t_prev, acp, 0.7, e_arg, key, False),
             compiled.ddim_step(cu(x), cu(p), cu(t), cu(t_prev), cu(acp), 0.7, cu(e_arg), cu(key), False)),
        ]
        for want, got in pairs:
            close(got.cpu(), want, dtype, extra_atol=20 * NOISE_ATOL)
        sums_cpu, sums_gpu = compiled.iso_sums(p, e_arg, s, o), compiled.iso_sums(cu(p), cu(e_arg), s, o)
        for want, got in zip(sums_cpu, sums_gpu, strict=True):
            torch.testing.assert_close(got.cpu().double(), want.double(), rtol=1e-5, atol=1e-4)
    like = torch.empty(n * B + 3)
    assert torch.equal(torch.ops.isofast_C.philox_bits(like.to(dev), s, o).cpu(), torch.ops.isofast_C.philox_bits(like, s, o))
    torch.testing.assert_close(torch.ops.isofast_C.philox_randn(like.to(dev), s, o).cpu(),
                               noise.randn_contract(seed, offset, like.numel()), rtol=0, atol=NOISE_ATOL)
