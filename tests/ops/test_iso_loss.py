"""The Iso-Diffusion loss on every fused backend, the reference beside it.

Its primitives ``iso_sums(p, e, seed, offset) -> (sse, ssq)`` and ``iso_grad(p, e, seed, offset, c1, c2)``
(``torch.ops.isofast_C`` and ``torch.ops.isofast_triton``) against their formulas, with explicit noise and
with noise generated in-kernel; the CPU's noise hand-off (the draw q_sample keeps, or the loss draws once,
passed as ``e``); the ops' autograd (iso_sums -> iso_grad) and the loss's O(B) tail (the compiled
``iso_loss_tail`` and the torch ops `_tail` of other devices); argument checks; then the public
``isofast.iso_ddpm_loss`` against ``backend="reference"``: values, parts, gradients in eps_pred and in
weights, dtypes, odd shapes, strides, saved tensors, torch.compile.
"""
from __future__ import annotations

import itertools
import math

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
from isofast import NoiseKey, NoiseSchedule, noise, reference
from isofast.ops import backends, extension, operands
from isofast.ops import iso_loss as loss_mod

LOSS_TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-6), torch.bfloat16: (1e-2, 1e-2),
            torch.float16: (2e-3, 2e-3)}
CASES = [(m, r) for m, r in itertools.product(("batch", "sample"), ("mean", "sum", "none")) if (m, r) != ("batch", "none")]


def sums_expr(p, eps):
    """(sse, ssq) in float64 of the same rounded inputs."""
    p, eps = p.to(torch.float64), eps.to(torch.float64)
    return ((p - eps) ** 2).sum(1), (p**2).sum(1)


def grad_expr(p, eps, c1, c2):
    a = acc(p.dtype)
    pa = p.to(a)
    return (c1[:, None] * (pa - eps.to(a)) + c2[:, None] * pa).to(p.dtype)


# ---------------------------------------------------------------- the primitives
@pytest.mark.parametrize("explicit", [False, True], ids=["keyed", "explicit"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_iso_sums_and_iso_grad_equal_formula(backend, dtype, explicit):
    backend.skip_unless_takes(dtype)
    dev = backend.device
    tol = PRIMITIVE_TOL[backend.family][dtype]
    # sums accumulate in the arithmetic type: compare with the float64 sums of the same rounded inputs
    sum_tol = backend.pick(compiled=(1e-12, 1e-12) if dtype == torch.float64 else (2e-6, 1e-5), triton=(1e-5, 1e-6))
    # generated noise vs the reference's normals: the compiled generator is a few ulp off them
    extra = 0.0 if explicit else backend.pick(compiled=NOISE_ATOL, triton=0.0)

    def body(shape, seed, offset, data_seed):
        B, n = shape
        gen = torch.Generator().manual_seed(data_seed)
        p = rand((B, n), dtype, gen, scale=1.3, device=dev)
        eps = rand((B, n), dtype, gen, device=dev) if explicit else eps_of(seed, offset, B, n, dev)
        e_arg = eps if explicit else None
        s, o = noise.to_signed(seed), noise.to_signed(offset)
        sse, ssq = backend.ops.iso_sums(p, e_arg, s, o)
        want_sse, want_ssq = sums_expr(p, eps)
        assert sse.dtype == ssq.dtype == acc(dtype) and sse.shape == ssq.shape == (B,)
        err = 2 * extra * (p.to(torch.float64) - eps.to(torch.float64)).abs().sum(1) + extra
        close(sse, want_sse, sum_tol, extra_atol=err.max().item())
        close(ssq, want_ssq, sum_tol)
        c1 = rand(B, acc(dtype), gen, device=dev)
        # Triton takes the expanded gradients autograd may hand in; the compiled ops take contiguous
        # (B,) coefficients (their autograd makes them so)
        c2 = backend.pick(compiled=rand(B, acc(dtype), gen, device=dev),
                          triton=rand(1, acc(dtype), gen, device=dev).expand(B))
        g = backend.ops.iso_grad(p, e_arg, s, o, c1, c2)
        assert g.dtype == dtype and g.shape == (B, n)
        close(g, grad_expr(p, eps, c1, c2), tol, extra_atol=extra * c1.abs().max().item())

    check(backend.pick(compiled=12, triton=4), body, EDGE_EXAMPLES, shape=PRIMITIVE_SHAPES[backend.family],
          seed=KEYS, offset=KEYS, data_seed=st.integers(0, 2**31))


def _check_generated_sums_and_grad(backend, B, n, seed, offset, sums_atol, data_seed):
    """iso_sums and iso_grad with in-kernel noise against the formulas over the contract's normals."""
    gen = torch.Generator().manual_seed(data_seed)
    p = torch.randn(B, n, generator=gen)
    eps = eps_of(seed, offset, B, n)
    dev = backend.device
    sse, ssq = backend.ops.iso_sums(p.to(dev), None, seed, offset)
    want_sse, want_ssq = sums_expr(p, eps)
    torch.testing.assert_close(sse.cpu().double(), want_sse, rtol=1e-5, atol=sums_atol)
    torch.testing.assert_close(ssq.cpu().double(), want_ssq, rtol=1e-5, atol=sums_atol)
    g = backend.ops.iso_grad(p.to(dev), None, seed, offset, torch.ones(B, device=dev), torch.zeros(B, device=dev))
    torch.testing.assert_close(g.cpu(), p - eps, rtol=0, atol=NOISE_ATOL)


@on("cpu", "cuda")
@pytest.mark.parametrize("n", [2047, 2048, 2049, 4099])
def test_iso_sums_multi_tile_rows(backend, n):
    # Rows longer than one tile (2048) with row starts that are not multiples of 4: the tile
    # partials and the noise's counter alignment must add up.
    _check_generated_sums_and_grad(backend, 3, n, 2**37 + 11, 2**34 + 3, sums_atol=1e-3, data_seed=n)


@on("cpu", "cuda")
@pytest.mark.parametrize("B,n", [(3000, 2), (1400, 3), (50, 301), (9, 1023)])
def test_iso_sums_short_rows_packed_several_per_tile(backend, B, n):
    # Rows shorter than half a tile are packed several per tile with one noise fill per tile; tiles
    # after the first start mid-stream (flat index not a multiple of 4 for odd n).
    _check_generated_sums_and_grad(backend, B, n, 2**40 + 5, 2**33 + 1, sums_atol=1e-4, data_seed=B * n)


@on("cpu")
def test_iso_sums_do_not_depend_on_thread_count(backend):
    B, n, seed = 3, 5000, 2**50
    p = torch.randn(B, n)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = backend.ops.iso_sums(p, None, seed, 0)
        torch.set_num_threads(max(2, before))
        many = backend.ops.iso_sums(p, None, seed, 0)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])
    assert math.isfinite(one[0].sum().item())


def test_iso_sums_of_empty_rows(backend):
    x = torch.randn(2, 0, device=backend.device)
    for e in (None, torch.randn(2, 0, device=backend.device)):
        sse, ssq = backend.ops.iso_sums(x, e, 0, 0)
        assert torch.equal(sse.cpu(), torch.zeros(2)) and torch.equal(ssq.cpu(), torch.zeros(2))


# ---------------------------------------------------------------- the CPU's noise hand-off
class _Recorder:
    """Counts `extension.draw` calls and records the ``e`` each iso_sums call of the loss receives."""

    def __init__(self, monkeypatch):
        self.draws, self.e = [], []
        draw, library = extension.draw, backends.library

        def counting_draw(like, seed, offset):
            self.draws.append(draw(like, seed, offset))
            return self.draws[-1]

        class Library:
            def __init__(lib, name):
                lib.ops = library(name)

            def __getattr__(lib, primitive):
                op = getattr(lib.ops, primitive)
                if primitive != "iso_sums":
                    return op

                def recording(p, e, seed, offset):
                    self.e.append(e)
                    return op(p, e, seed, offset)

                return recording

        monkeypatch.setattr(extension, "draw", counting_draw)
        monkeypatch.setattr(backends, "library", Library)


def _regenerating_loss(p, seed, offset, *args):
    """The loss with iso_sums (and so iso_grad) regenerating the draw in the kernels: (loss, grad)."""
    leaf = p.detach().requires_grad_()
    rows = operands.rows(leaf)
    sse, ssq = torch.ops.isofast_C.iso_sums(rows, None, noise.to_signed(seed), noise.to_signed(offset))
    loss = loss_mod._tail(sse, ssq, rows.shape[1], *args)[0]
    loss.backward()
    return loss.detach(), leaf.grad


@on("cpu")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kept_draw_gives_the_regenerated_numbers(backend, monkeypatch, dtype):
    # The CPU loss reads the draw instead of regenerating it: the one q_sample kept (NoiseKey.kept),
    # or, for a key that carries nothing (the loss on its own), one it draws once (extension.draw)
    # and passes as e to iso_sums, whose autograd passes it on to iso_grad. Either way, bit for bit
    # the numbers of the kernels regenerating it; the draw is the kernel generator's, in float32
    # (float64 for float64 data).
    B, n, seed, offset = 3, 1001, 2**45 + 9, 2**36 + 1
    ops = torch.ops.isofast_C
    p, x0 = torch.randn(B, n).to(dtype), torch.randn(B, n).to(dtype)
    c1, c2 = torch.randn(B, dtype=acc(dtype)), torch.randn(B, dtype=acc(dtype))
    regen = (ops.iso_sums(p, None, seed, offset), ops.iso_grad(p, None, seed, offset, c1, c2))

    # the primitives given the draw as e
    drawn = extension.draw(p, seed, offset)
    assert drawn.dtype == acc(dtype) and drawn.shape == (B, n)
    assert torch.equal(drawn, ops.philox_randn(p, seed, offset).reshape(B, n).to(acc(dtype)))
    given_e = (ops.iso_sums(p, drawn, seed, offset), ops.iso_grad(p, drawn, seed, offset, c1, c2))
    assert torch.equal(regen[0][0], given_e[0][0]) and torch.equal(regen[0][1], given_e[0][1])
    assert torch.equal(regen[1], given_e[1])
    # iso_sums' autograd hands e on to iso_grad: c1 = 2 g_sse, c2 = 2 g_ssq
    leaf = p.clone().requires_grad_()
    sse, ssq = ops.iso_sums(leaf, drawn, seed, offset)
    (sse * (c1 / 2) + ssq * (c2 / 2)).sum().backward()
    assert torch.equal(leaf.grad, regen[1])

    # the public ops: a key that carries nothing, then q_sample's key that carries its draw
    sched = NoiseSchedule.linear(T=10, dtype=acc(dtype))
    key = NoiseKey(seed=seed, offset=offset, shape=(B, n), dtype=dtype)
    want = _regenerating_loss(p, seed, offset, None, 0.3, "batch", "mean")
    rec = _Recorder(monkeypatch)
    results = {}
    for name, k in (("alone", key), ("kept", isofast.q_sample(x0, torch.tensor([0, 5, 9]), sched, key, backend="cpu")[1])):
        leaf = p.clone().requires_grad_()
        loss = isofast.iso_ddpm_loss(leaf, k, 0.3, "batch", backend="cpu")
        loss.backward()
        results[name] = (loss.detach(), leaf.grad, k)
    assert len(rec.draws) == 1  # the loss on its own drew once; with the kept draw it drew nothing
    assert rec.e[0] is rec.draws[0]
    kept = results["kept"][2].kept
    assert kept is not None and torch.equal(rec.e[1], kept.to(acc(dtype)))
    assert torch.equal(kept, ops.philox_randn(x0, seed, offset).reshape(B, n).to(acc(dtype)))
    for name, (loss, grad, _) in results.items():
        assert torch.equal(loss, want[0]), name
        assert torch.equal(grad, want[1]), name


@on("cpu")
@pytest.mark.parametrize("loss_dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_a_draw_kept_for_float32_data_serves_a_loss_of_another_dtype(backend, monkeypatch, loss_dtype):
    # Mixed precision: float32 x0 through q_sample, eps_pred in bf16 (autocast) or float64. The loss
    # reads the float32 draw (converted exactly) and equals the regenerating kernels bit for bit.
    B, n, seed, offset = 4, 777, 2**50 + 3, 11
    t = torch.tensor([1, 2, 3, 4])
    x0 = torch.randn(B, n)
    p = torch.randn(B, n).to(loss_dtype)
    c1, c2 = torch.randn(B, dtype=acc(loss_dtype)), torch.randn(B, dtype=acc(loss_dtype))
    ops = torch.ops.isofast_C
    _, key = isofast.q_sample(x0, t, NoiseSchedule.linear(T=10), NoiseKey(seed, offset, (B, n)), backend="cpu")
    assert key.kept is not None and key.kept.dtype == torch.float32
    e = operands.noise(key, p, use_kept=True)[0]
    assert e.dtype == acc(loss_dtype) and torch.equal(e, key.kept.to(acc(loss_dtype)))
    got = (ops.iso_sums(p, e, seed, offset), ops.iso_grad(p, e, seed, offset, c1, c2))
    want = (ops.iso_sums(p, None, seed, offset), ops.iso_grad(p, None, seed, offset, c1, c2))
    assert torch.equal(got[0][0], want[0][0]) and torch.equal(got[0][1], want[0][1])
    assert torch.equal(got[1], want[1])
    # the public loss: served from the kept draw, nothing new drawn, the regenerating kernels' numbers
    rec = _Recorder(monkeypatch)
    leaf = p.clone().requires_grad_()
    loss = isofast.iso_ddpm_loss(leaf, key, 0.3, "sample", backend="cpu")
    loss.backward()
    assert rec.draws == [] and len(rec.e) == 1 and torch.equal(rec.e[0], e)
    want_loss, want_grad = _regenerating_loss(p, seed, offset, None, 0.3, "sample", "mean")
    assert torch.equal(loss.detach(), want_loss) and torch.equal(leaf.grad, want_grad)


# ---------------------------------------------------------------- argument checks of the primitives
@on("cpu")
def test_float32_noise_beside_16bit_data_is_checked(backend):
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


@on("cpu", "cuda")
def test_compiled_iso_ops_bad_input_raises_clear_errors(backend):
    dev = backend.device
    x = torch.randn(3, 8, device=dev)
    ops = torch.ops.isofast_C
    with pytest.raises(RuntimeError, match="e must have dtype"):
        ops.iso_sums(x, x.double(), 0, 0)
    with pytest.raises(RuntimeError, match="c1 and c2 must have shape"):
        ops.iso_grad(x, None, 0, 0, torch.ones(2, device=dev), torch.ones(3, device=dev))
    with pytest.raises(RuntimeError, match="p must be contiguous"):
        ops.iso_sums(torch.randn(8, 3, device=dev).t(), None, 0, 0)
    with pytest.raises(RuntimeError, match="c2 must be contiguous"):
        ops.iso_grad(x, None, 0, 0, torch.ones(3, device=dev), torch.ones(1, device=dev).expand(3))


@on("triton")
def test_triton_iso_ops_refuse_float64_and_non_row_layouts(backend):
    dev = backend.device
    p = torch.randn(2, 5, dtype=torch.float64, device=dev)
    ones = torch.ones(2, device=dev)
    with pytest.raises(TypeError, match="eps_pred"):
        backend.ops.iso_sums(p, None, 0, 0)
    with pytest.raises(TypeError, match="eps_pred"):
        backend.ops.iso_grad(p, None, 0, 0, ones, ones)
    with pytest.raises(ValueError, match="eps_pred"):
        backend.ops.iso_sums(torch.randn(5, 2, device=dev).t(), None, 0, 0)
    with pytest.raises(ValueError, match="noise"):
        backend.ops.iso_sums(torch.randn(2, 5, device=dev), torch.randn(2, 4, device=dev), 0, 0)


# ---------------------------------------------------------------- autograd of the ops
def _grad_operands(backend, dtype, data_seed, B, n, with_e):
    """(gen, p, e, inputs) of the ops' autograd tests: p, and e when ``with_e``, leaves that require grad."""
    gen = torch.Generator().manual_seed(data_seed)
    p = rand((B, n), dtype, gen, device=backend.device).requires_grad_()
    e = rand((B, n), dtype, gen, device=backend.device).requires_grad_() if with_e else None
    return gen, p, e, (p, e) if with_e else (p,)


@on("cpu", "cuda")
@pytest.mark.parametrize("with_e", [False, True], ids=["keyed", "explicit"])
def test_compiled_iso_sums_op_gradcheck(backend, with_e):
    # C++ autograd: dp = iso_grad(p, e, 2 g_sse, 2 g_ssq), de = -2 g_sse (p - e)
    dev, f64 = backend.device, torch.float64
    B, n, seed, offset = 3, 7, 2**40 + 3, 5
    gen, p, e, inputs = _grad_operands(backend, f64, 8, B, n, with_e)
    op = torch.ops.isofast_C.iso_sums
    assert torch.autograd.gradcheck(lambda q, *z: op(q, z[0] if z else None, seed, offset), inputs)
    # the same gradients as the formula's autograd, for each output alone and together
    # keyed: the kernels' own draw (the reference's normals are a few ulp off it)
    eps = e if with_e else torch.ops.isofast_C.philox_randn(p.detach(), seed, offset).view(B, n).to(f64)
    u1, u2 = rand(B, f64, gen, device=dev), rand(B, f64, gen, device=dev)
    for w1, w2 in ((u1, u2), (u1, 0 * u2), (0 * u1, u2)):
        sse, ssq = op(p, e, seed, offset)
        got = torch.autograd.grad((sse * w1 + ssq * w2).sum(), inputs)
        want_sse, want_ssq = sums_expr(p, eps)
        want = torch.autograd.grad((want_sse * w1 + want_ssq * w2).sum(), inputs)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@on("cpu")
@pytest.mark.parametrize("mode,reduction", CASES)
@pytest.mark.parametrize("weighted", [False, True])
def test_compiled_iso_loss_tail_op_gradcheck(backend, mode, reduction, weighted):
    # dsse = k1 g / 2, dssq = k2 g / 2, dw = d_w g, against finite differences and the oracle's autograd
    B, n, lam = 4, 6, 0.7
    sse, ssq, w = _sums(B, n, torch.float64, 3)
    sse, ssq = sse.requires_grad_(), ssq.requires_grad_()
    w = w.requires_grad_() if weighted else None
    inputs = (sse, ssq, w) if weighted else (sse, ssq)
    tail = torch.ops.isofast_C.iso_loss_tail

    def loss(a, b, *ws):
        return tail(a, b, n, ws[0] if ws else None, lam, mode, reduction)[0]

    assert torch.autograd.gradcheck(loss, inputs)
    upstream = torch.randn(B if reduction == "none" else (), dtype=torch.float64)
    got = torch.autograd.grad((loss(*inputs) * upstream).sum(), inputs)
    want_loss, _ = reference.loss_from_terms(sse / n, ssq / n, lam, mode, w, reduction)
    want = torch.autograd.grad((want_loss * upstream).sum(), inputs)
    for g, e in zip(got, want, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
    outputs = tail(sse, ssq, n, w, lam, mode, reduction)
    assert outputs[0].requires_grad and not any(o.requires_grad for o in outputs[1:])  # only the loss


@on("triton")
@pytest.mark.parametrize("with_e", [False, True], ids=["keyed", "explicit"])
def test_triton_iso_sums_op_gradient_equals_formula_autograd(backend, with_e):
    # torch.library.register_autograd (isofast/ops/iso_loss.py), in float32
    dev = backend.device
    B, n, seed, offset = 3, 37, 2**63 + 1, 2**32 - 1
    gen, p, e, inputs = _grad_operands(backend, torch.float32, 9, B, n, with_e)
    eps = e if with_e else eps_of(seed, offset, B, n, dev)
    u1, u2 = rand(B, torch.float32, gen, device=dev), rand(B, torch.float32, gen, device=dev)
    s, o = noise.to_signed(seed), noise.to_signed(offset)
    for w1, w2 in ((u1, u2), (u1, None), (None, u2)):
        sse, ssq = backend.ops.iso_sums(p, e, s, o)
        want_sse, want_ssq = ((p - eps) ** 2).sum(1), (p**2).sum(1)
        # an output with no gradient (None): no edge to it in the formula's graph, zeros from the op
        got = torch.autograd.grad(sum((x * w).sum() for x, w in ((sse, w1), (ssq, w2)) if w is not None), inputs)
        want = torch.autograd.grad(sum((x * w).sum() for x, w in ((want_sse, w1), (want_ssq, w2)) if w is not None),
                                   inputs, allow_unused=True, materialize_grads=True)
        for g, w in zip(got, want, strict=True):
            assert g.dtype == torch.float32
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- the O(B) tail
def _sums(B, n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    sse = (torch.rand(B, generator=g, dtype=torch.float64) * 3 * n).to(dtype)
    ssq = (torch.rand(B, generator=g, dtype=torch.float64) * 2 * n).to(dtype)
    w = (torch.rand(B, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    return sse, ssq, w


@pytest.fixture
def torch_tail(monkeypatch):
    """Force `_tail` onto its torch ops (what non-CPU tensors take) on the CPU."""
    monkeypatch.setattr(backends, "usable", lambda name: False)
    return loss_mod._tail


@pytest.mark.parametrize("mode,reduction", CASES)
@pytest.mark.parametrize("weighted", [False, True])
def test_torch_tail_slopes_equal_autograd_of_the_oracle(torch_tail, mode, reduction, weighted):
    B, n, lam = 5, 7, 0.7
    sse, ssq, w = _sums(B, n, torch.float64, 1)
    mse_b = (sse / n).requires_grad_()
    s_b = (ssq / n).requires_grad_()
    wr = w.clone().requires_grad_() if weighted else None
    upstream = torch.randn(B if reduction == "none" else (), dtype=torch.float64)
    want_loss, want_parts = reference.loss_from_terms(mse_b, s_b, lam, mode, wr, reduction)
    grads = torch.autograd.grad((want_loss * upstream).sum(), [mse_b, s_b] + ([wr] if weighted else []))

    loss, mse, iso, isotropy, k1, k2, d_w = torch_tail(sse, ssq, n, w if weighted else None, lam, mode, reduction)
    torch.testing.assert_close(loss, want_loss.detach(), rtol=1e-12, atol=1e-12)
    for got, want in zip((mse, iso, isotropy), want_parts, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(k1 * upstream, (2.0 / n) * grads[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(k2 * upstream, (2.0 / n) * grads[1], rtol=1e-12, atol=1e-12)
    if weighted:
        torch.testing.assert_close(d_w * upstream, grads[2], rtol=1e-12, atol=1e-12)


@on("cpu")
@pytest.mark.parametrize("mode,reduction", CASES)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("B", [1, 3, 64])
def test_compiled_tail_equals_torch_tail(backend, monkeypatch, mode, reduction, weighted, dtype, B):
    n, lam = 3072, 0.3
    sse, ssq, w = _sums(B, n, dtype, B)
    got = loss_mod._tail(sse, ssq, n, w if weighted else None, lam, mode, reduction)
    monkeypatch.setattr(backends, "usable", lambda name: False)
    _assert_tails_close(got, loss_mod._tail(sse, ssq, n, w if weighted else None, lam, mode, reduction), dtype)


def _assert_tails_close(got, want, dtype):
    """The compiled tail's outputs against the torch-ops tail's. float32: the torch ops round (S - 1) in float32
    (the compiled op works in float64), so the small batch penalty (S - 1)^2 agrees to an absolute, not a
    relative, tolerance."""
    rtol, atol = (1e-12, 1e-15) if dtype == torch.float64 else (2e-6, 1e-7)
    for name, g, e in zip(("loss", "mse", "iso", "isotropy", "k1", "k2", "d_w"), got, want, strict=True):
        assert g.dtype == dtype and g.shape == e.shape, name
        torch.testing.assert_close(g, e, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


@on("cpu")
@pytest.mark.parametrize("mode,reduction", CASES)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_compiled_tail_with_groups_equals_torch_tail_and_each_group(backend, monkeypatch, mode, reduction, weighted,
                                                                     dtype):
    # an ensemble's G groups, one lambda each: the compiled op against `_LossTail` and against G one-group calls
    G, per, n = 4, 16, 3072
    lambdas = torch.tensor([0.0, 0.3, 0.05, 1.5], dtype=torch.float64)
    sse, ssq, w = _sums(G * per, n, dtype, 7)
    w = w if weighted else None
    got = loss_mod._tail(sse, ssq, n, w, lambdas, mode, reduction, G)
    for g in range(G):
        rows = slice(g * per, (g + 1) * per)
        alone = loss_mod._tail(sse[rows].contiguous(), ssq[rows].contiguous(), n,
                               None if w is None else w[rows].contiguous(), float(lambdas[g]), mode, reduction)
        for name, a, b in zip(("loss", "mse", "iso", "isotropy", "k1", "k2", "d_w"), got, alone, strict=True):
            part = a[rows] if a.numel() == G * per else a[g]
            assert torch.equal(part, b), (g, name)  # the same formulas on the same sums: bit for bit
    monkeypatch.setattr(backends, "usable", lambda name: False)
    _assert_tails_close(got, loss_mod._tail(sse, ssq, n, w, lambdas, mode, reduction, G), dtype)


@on("cpu")
@pytest.mark.parametrize("mode,reduction", CASES)
def test_compiled_tail_with_groups_gradcheck(backend, mode, reduction):
    # each group's loss differentiates into its own rows only (the upstream gradient is one value per group)
    B, n, lambdas = 6, 5, torch.tensor([0.7, 0.0, 2.0], dtype=torch.float64)
    sse, ssq, w = _sums(B, n, torch.float64, 11)
    inputs = (sse.requires_grad_(), ssq.requires_grad_(), w.requires_grad_())
    tail = torch.ops.isofast_C.iso_loss_tail

    def loss(a, b, ws):
        return tail(a, b, n, ws, 0.0, mode, reduction, lambdas)[0]

    assert torch.autograd.gradcheck(loss, inputs)


@on("cpu")
def test_compiled_tail_rejects_bad_arguments(backend):
    sse, ssq, _ = _sums(4, 8, torch.float32, 0)
    tail = torch.ops.isofast_C.iso_loss_tail
    with pytest.raises(RuntimeError, match="iso_mode must be"):
        tail(sse, ssq, 8, None, 0.3, "bogus", "mean")
    with pytest.raises(RuntimeError, match="reduction must be"):
        tail(sse, ssq, 8, None, 0.3, "batch", "avg")
    with pytest.raises(RuntimeError, match="reduction 'none' needs"):
        tail(sse, ssq, 8, None, 0.3, "batch", "none")
    with pytest.raises(RuntimeError, match="ssq must match sse"):
        tail(sse, ssq[:3], 8, None, 0.3, "batch", "mean")
    with pytest.raises(RuntimeError, match="sse must be float32 or float64"):
        tail(sse.half(), ssq.half(), 8, None, 0.3, "batch", "mean")
    with pytest.raises(RuntimeError, match="weights must be"):
        tail(sse, ssq, 8, torch.ones(3), 0.3, "batch", "mean")
    with pytest.raises(RuntimeError, match="weights must be"):
        tail(sse, ssq, 8, torch.ones(4, dtype=torch.float64), 0.3, "batch", "mean")
    with pytest.raises(RuntimeError, match="n must be positive"):
        tail(sse, ssq, 0, None, 0.3, "batch", "mean")
    with pytest.raises(RuntimeError, match=r"lambdas must be a float \(G,\) tensor .* with G dividing the 4 sums"):
        tail(sse, ssq, 8, None, 0.0, "batch", "mean", torch.ones(3))
    with pytest.raises(RuntimeError, match=r"lambdas must be a float \(G,\) tensor"):
        tail(sse, ssq, 8, None, 0.0, "batch", "mean", torch.ones(2, dtype=torch.int64))


# ---------------------------------------------------------------- the public loss against the reference
def _key(shape, dtype, seed, offset, device):
    return NoiseKey(seed=seed, offset=offset, shape=shape, dtype=dtype, device=device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_public_loss_equals_reference_forward_backward(backend, dtype):
    backend.skip_unless_takes(dtype)
    dev = backend.device

    def body(shape, seed, keyed, mode, reduction, weighted, lam):
        if mode == "batch" and reduction == "none":
            reduction = "mean"
        B = shape[0]
        eps = _key(shape, dtype, seed, 0, dev) if keyed else torch.randn(shape, dtype=torch.float64).to(dtype).to(dev)
        weights = (torch.rand(B, dtype=acc(dtype)) + 0.5).to(dev) if weighted else None
        results = []
        for name in (backend.name, "reference"):
            p = (torch.randn(shape, generator=torch.Generator().manual_seed(seed % 2**31), dtype=torch.float64) * 1.2)
            p = p.to(dtype).to(dev).requires_grad_()
            loss, parts = isofast.iso_ddpm_loss(p, eps, lam, mode, weights, reduction, return_parts=True, backend=name)
            loss.sum().backward()
            results.append((loss.detach(), parts, p.grad))
        (l_got, parts_got, g_got), (l_ref, parts_ref, g_ref) = results
        rtol, atol = LOSS_TOL[dtype]
        extra = 4 * NOISE_ATOL if keyed else 0.0
        assert l_got.dtype == l_ref.dtype == acc(dtype) and l_got.shape == l_ref.shape
        torch.testing.assert_close(l_got, l_ref, rtol=rtol, atol=atol + extra)
        for a, b in zip(parts_got, parts_ref, strict=True):
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol + extra)
        assert g_got.dtype == dtype and g_got.shape == shape
        close(g_got, g_ref, PUBLIC_TOL[dtype], extra_atol=extra)

    check(8, body, shape=IMAGE_SHAPES, seed=U64, keyed=st.booleans(), mode=st.sampled_from(["batch", "sample"]),
          reduction=st.sampled_from(["mean", "sum", "none"]), weighted=st.booleans(),
          lam=st.sampled_from([0.0, 0.3, 2.0]))


@pytest.mark.parametrize("keyed", [True, False], ids=["keyed", "explicit"])
def test_public_loss_and_upstream_gradient_equal_reference(backend, keyed):
    dev = backend.device

    def body(data_seed, batch, n, mode, reduction, weighted, iso_lambda):
        gen = torch.Generator().manual_seed(data_seed)
        if mode == "batch" and reduction == "none":
            reduction = "mean"
        shape = (batch, n) if n % 2 else (batch, 2, n // 2)  # the API flattens per sample
        key = NoiseKey.draw(shape, device=dev, generator=gen)
        eps = key if keyed else torch.randn(shape, generator=gen).to(dev)
        weights = (torch.rand(batch, generator=gen) + 0.5).to(dev) if weighted else None
        results = {}
        for name in (backend.name, "reference"):
            p = (1.3 * torch.randn(shape, generator=torch.Generator().manual_seed(data_seed))).to(dev)
            p.requires_grad_(True)
            loss, parts = isofast.iso_ddpm_loss(p, eps, iso_lambda, mode, weights, reduction,
                                                return_parts=True, backend=name)
            upstream = torch.linspace(0.5, 1.5, loss.numel(), device=dev).reshape(loss.shape)
            (loss * upstream).sum().backward()
            results[name] = (loss.detach(), parts, p.grad)
        (loss_t, parts_t, grad_t), (loss_r, parts_r, grad_r) = results[backend.name], results["reference"]
        torch.testing.assert_close(loss_t, loss_r, rtol=1e-5, atol=1e-6)
        for got, want in zip(parts_t, parts_r, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad_t, grad_r, rtol=1e-5, atol=1e-7)

    check(8, body, data_seed=st.integers(0, 2**16), batch=st.integers(1, 4), n=LENGTHS,
          mode=st.sampled_from(["batch", "sample"]), reduction=st.sampled_from(["mean", "sum", "none"]),
          weighted=st.booleans(), iso_lambda=st.sampled_from([0.0, 0.3, 2.0]))


def _paths(backend):
    """(backend, torch tail) paths of the public loss: the compiled tail on CPU tensors, else the torch ops."""
    if backend.device.type != "cpu" or not backends.usable("cpu"):
        return [(backend.name, False)]
    return [(backend.name, False), (backend.name, True)]  # True: the torch tail with the same kernels


@pytest.mark.parametrize("mode,reduction", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("keyed", [False, True])
def test_public_loss_weights_and_upstream_gradient(backend, monkeypatch, mode, reduction, dtype, keyed):
    """Gradients of eps_pred and of weights that require grad, under a random upstream gradient."""
    backend.skip_unless_takes(dtype)
    dev = backend.device
    shape = (4, 3, 5)
    g = torch.Generator().manual_seed(7)
    p0 = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(dev)
    w0 = (torch.rand(4, generator=g, dtype=torch.float64) + 0.5).to(dtype).to(dev)
    key = NoiseKey(seed=99, offset=3, shape=shape, dtype=dtype, device=dev)
    eps = key.materialize(dtype) if not keyed else key
    upstream = torch.randn(4 if reduction == "none" else (), generator=g, dtype=torch.float64).to(dtype).to(dev)
    results = {}
    for name, torch_tail in [("reference", False)] + _paths(backend):
        with monkeypatch.context() as m:
            if torch_tail:
                m.setattr(backends, "usable", lambda name: False)
            p, w = p0.clone().requires_grad_(), w0.clone().requires_grad_()
            loss = isofast.iso_ddpm_loss(p, eps, 0.4, mode, w, reduction, backend=name)
            (loss * upstream).sum().backward()
            results[(name, torch_tail)] = (loss.detach(), p.grad, w.grad)
    want = results.pop(("reference", False))
    # Keyed: the reference materialises the contract's normals, the kernels generate their own (a few ulp apart).
    tol = 1e-10 if dtype == torch.float64 and not keyed else 2e-5
    for path, got in results.items():
        for name, a, b in zip(("loss", "grad eps_pred", "grad weights"), got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m, name=name, path=path: f"{path} {name}: {m}")


@on("cpu", "cuda")
def test_public_loss_gradcheck_float64(backend):
    dev = backend.device
    shape = (3, 2, 5)
    key = _key(shape, torch.float64, 2**40 + 1, 2**33, dev)
    w = (torch.rand(3, dtype=torch.float64) + 0.5).to(dev)
    p = torch.randn(shape, dtype=torch.float64, device=dev, requires_grad=True)
    for mode, reduction in (("batch", "mean"), ("sample", "sum"), ("sample", "none")):
        def f(x, mode=mode, reduction=reduction):
            return isofast.iso_ddpm_loss(x, key, 0.7, mode, w, reduction, backend=backend.name)
        assert torch.autograd.gradcheck(f, (p,))


@on("cpu", "cuda")
def test_public_loss_gradcheck_in_weights_float64(backend):
    dev = backend.device
    shape = (3, 4)
    key = NoiseKey(seed=5, offset=0, shape=shape, dtype=torch.float64, device=dev)
    p = torch.randn(shape, dtype=torch.float64, device=dev, requires_grad=True)
    w = (torch.rand(3, dtype=torch.float64, device=dev) + 0.5).requires_grad_()
    for mode, reduction in CASES:
        def f(x, weights, mode=mode, reduction=reduction):
            return isofast.iso_ddpm_loss(x, key, 0.7, mode, weights, reduction, backend=backend.name)

        assert torch.autograd.gradcheck(f, (p, w))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_public_loss_takes_any_strides(backend, dtype):
    """Non-contiguous eps_pred, noise and weights (views, channels_last, strided) give the reference's values and grads."""
    backend.skip_unless_takes(dtype)
    dev = backend.device

    def body(shape, seed, keyed, layout, mode, weighted):
        g = torch.Generator().manual_seed(seed % 2**31)
        B = shape[0]
        p0 = laid_out(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(dev), layout)
        w = (torch.rand(2 * B, generator=g, dtype=torch.float64) + 0.5).to(acc(dtype)).to(dev)[::2] if weighted else None
        eps = (_key(shape, dtype, seed, 3, dev) if keyed
               else laid_out(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(dev), layout))
        extra = 4 * NOISE_ATOL if keyed else 0.0
        results = {}
        for name in (backend.name, "reference"):
            p = p0.detach().clone().requires_grad_()  # clone keeps the layout (preserve_format)
            loss = isofast.iso_ddpm_loss(p, eps, 0.3, mode, w, backend=name)
            loss.backward()
            results[name] = (loss.detach(), p.grad)
        for what, got, want in zip(("loss", "grad"), results[backend.name], results["reference"], strict=True):
            assert got.shape == want.shape and got.dtype == want.dtype, what
            close(got, want, PUBLIC_TOL[dtype if what != "loss" else acc(dtype)],
                  extra_atol=extra + (1e-6 if what == "loss" else 0.0), msg=what)

    check(10, body, shape=st.sampled_from([(2, 3), (3, 4, 5), (2, 3, 4, 5), (4, 2, 3, 3)]), seed=U64,
          keyed=st.booleans(), layout=st.sampled_from(LAYOUTS), mode=st.sampled_from(["batch", "sample"]),
          weighted=st.booleans())


@pytest.mark.parametrize("keyed", [True, False])
@pytest.mark.parametrize("mode", ["batch", "sample"])
def test_public_loss_saves_nothing_beyond_eps_pred(backend, keyed, mode):
    # eps_pred (+ the noise: an explicit tensor, or on a backend that reads its draw, the draw) + O(B) scalars
    dev = backend.device
    batch, shape = 3, (3, 2, 5, 7)
    p = torch.randn(shape, device=dev, requires_grad=True)
    eps = NoiseKey.draw(shape, device=dev) if keyed else torch.randn(shape, device=dev)
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = isofast.iso_ddpm_loss(p, eps, 0.3, mode, torch.rand(batch, device=dev), backend=backend.name)
    row_bytes = p.numel() * p.element_size()
    noise_saved = not keyed or backend.keeps_draw
    allowed = row_bytes * (2 if noise_saved else 1) + 64 * batch * 8
    assert row_bytes <= sum(saved) <= allowed, saved  # eps_pred itself is saved (the hooks see the op's autograd)
    assert max(saved) <= row_bytes
    loss.backward()
    assert p.grad is not None and p.grad.shape == p.shape


def test_public_loss_second_derivative_raises_or_equals_reference(backend):
    """A gradient penalty differentiates the loss's gradient again. iso_grad has no derivative of its own,
    so the fused loss must refuse instead of silently dropping the loss's second-order term.
    (once_differentiable refuses only when the upstream gradient itself requires grad: not the usual
    ``torch.autograd.grad(loss, w, create_graph=True)``, whose upstream gradient is a constant one.)"""
    torch.manual_seed(0)
    dev = backend.device
    lin = torch.nn.Linear(5, 5).to(dev)
    x = torch.randn(3, 5, device=dev)
    key = NoiseKey(seed=1, offset=2, shape=(3, 5), device=dev)

    def penalty_grad(name):
        loss = isofast.iso_ddpm_loss(lin(x), key, 0.3, backend=name)
        (g_w,) = torch.autograd.grad(loss, lin.weight, create_graph=True)
        (h,) = torch.autograd.grad((g_w**2).sum() + lin.weight.sum(), lin.weight)
        return h

    want = penalty_grad("reference")
    try:
        got = penalty_grad(backend.name)
    except RuntimeError:
        return  # refused: fine
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_public_loss_bad_input_same_errors_as_reference(backend):
    x0 = torch.randn(2, 3, device=backend.device)
    cases = [
        lambda b: isofast.iso_ddpm_loss(x0, torch.randn(2, 4, device=backend.device), backend=b),
        lambda b: isofast.iso_ddpm_loss(x0, torch.randn(2, 3, device=backend.device), iso_mode="bogus", backend=b),
    ]
    for case in cases:
        errors = []
        for name in (backend.name, "reference"):
            with pytest.raises((ValueError, TypeError)) as info:
                case(name)
            errors.append((type(info.value), str(info.value)))
        assert errors[0] == errors[1]


@pytest.mark.parametrize("mode,reduction", [("batch", "mean"), ("batch", "sum"), ("sample", "mean"), ("sample", "none")])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("seed,offset", [(2**40 + 9, 2**32 - 37), (2**64 - 1, 2**64 - 37)])
def test_same_noising_loss_and_gradient_as_reference(backend, mode, reduction, weighted, seed, offset):
    # With the same key, every backend draws the same eps and gives the reference's x_t, loss and gradient.
    shape = (3, 2, 5, 7)
    g = torch.Generator().manual_seed(seed % 1000)
    x0 = torch.randn(shape, generator=g)
    p0 = 1.2 * torch.randn(shape, generator=g)
    t = torch.randint(0, 1000, (shape[0],), generator=g)
    w = torch.rand(shape[0], generator=g) + 0.5 if weighted else None
    upstream = torch.randn(shape[0] if reduction == "none" else (), generator=g)
    sched = isofast.NoiseSchedule.linear(1000)
    out = {}
    for name, device in ((backend.name, backend.device), ("reference", torch.device("cpu"))):
        key = NoiseKey(seed=seed, offset=offset, shape=shape, device=device)
        x_t, _ = isofast.q_sample(x0.to(device), t.to(device), sched, key, backend=name)
        p = p0.to(device).requires_grad_()
        loss = isofast.iso_ddpm_loss(p, key, 0.3, mode, None if w is None else w.to(device), reduction, backend=name)
        (loss * upstream.to(device)).sum().backward()
        out[name] = (x_t.cpu(), loss.detach().cpu(), p.grad.cpu())
    for what, got, want in zip(("x_t", "loss", "grad"), out[backend.name], out["reference"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5, msg=lambda m, n=what: f"{backend} {n}: {m}")


# ---------------------------------------------------------------- torch.compile
def test_torch_compile_fullgraph_loss_equals_eager(backend):
    dev = backend.device
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.SiLU(), torch.nn.Linear(16, 6)).to(dev)
    sched = NoiseSchedule.linear(T=100)
    x0 = torch.randn(4, 6, device=dev)
    t = torch.randint(0, 100, (4,), device=dev)
    key = NoiseKey(seed=1234, offset=77, shape=(4, 6), device=dev)

    def step(x0, t):
        x_t, eps = isofast.q_sample(x0, t, sched, key, backend=backend.name)
        return isofast.iso_ddpm_loss(model(x_t), eps, 0.3, backend=backend.name)

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


def test_noising_and_loss_compile_without_graph_breaks(backend):
    """fullgraph=True raises on any graph break: the custom ops must be traceable end to end."""
    dev = backend.device
    sched = NoiseSchedule.linear(T=50).to(device=dev)

    def train_step(x0, t, scale):
        x_t, key = isofast.q_sample(x0, t, sched, NoiseKey(seed=5, offset=2**40, shape=x0.shape, device=dev),
                                    backend=backend.name)
        return isofast.iso_ddpm_loss(x_t * scale, key, 0.3, "batch", backend=backend.name)

    x0, t = torch.randn(3, 2, 5, device=dev), torch.randint(0, 50, (3,), device=dev)
    grads = []
    torch._dynamo.reset()
    for fn in (torch.compile(train_step, backend="aot_eager", fullgraph=True), train_step):
        scale = torch.ones(1, device=dev, requires_grad=True)
        loss = fn(x0, t, scale)
        loss.backward()
        grads.append((loss.detach(), scale.grad))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=0)


# ---------------------------------------------------------------- CUDA against the CPU (on a GPU only)
@on("cuda")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (3, 7), (5, 8), (4, 3072), (2, 70001)])
def test_cuda_iso_ops_equal_cpu(backend, dtype, shape):
    B, n = shape
    seed, offset = 2**41 + 5, 2**35 + 7
    gen = torch.Generator().manual_seed(B * n)
    p, e = rand((B, n), dtype, gen), rand((B, n), dtype, gen)
    c1, c2 = (torch.randn(B, generator=gen, dtype=torch.float64).to(acc(dtype)) for _ in range(2))
    s, o = noise.to_signed(seed), noise.to_signed(offset)
    ops, cu = torch.ops.isofast_C, (lambda z: None if z is None else z.to(backend.device))
    for e_arg in (None, e):
        close(ops.iso_grad(cu(p), cu(e_arg), s, o, cu(c1), cu(c2)), ops.iso_grad(p, e_arg, s, o, c1, c2), PUBLIC_TOL[dtype],
              extra_atol=20 * NOISE_ATOL)
        sums_cpu, sums_gpu = ops.iso_sums(p, e_arg, s, o), ops.iso_sums(cu(p), cu(e_arg), s, o)
        for want, got in zip(sums_cpu, sums_gpu, strict=True):
            torch.testing.assert_close(got.cpu().double(), want.double(), rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------- prediction types and min-SNR weights
PREDICTIONS = ("v_prediction", "sample")


def _affine_terms_expr(p, eps, x0, coef):
    """(r, h) in float64: r = p - (coef0 eps + coef1 x0), h = coef2 p + coef3 eps + coef4 x0 (coef (5, B))."""
    p, eps, x0 = (v.to(torch.float64) for v in (p, eps, x0))
    k = coef.to(torch.float64).unsqueeze(2)
    return p - (k[0] * eps + k[1] * x0), k[2] * p + k[3] * eps + k[4] * x0


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("explicit", [False, True], ids=["keyed", "explicit"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_iso_sums_and_iso_grad_with_x0_and_coef_equal_formula(backend, dtype, explicit, prediction_type):
    # sse = sum r^2, ssq = sum h^2, g = c1 r + c2 coef2 h, with the coefficients of a real schedule
    backend.skip_unless_takes(dtype)
    dev, a = backend.device, acc(dtype)
    sched = NoiseSchedule.linear(50)
    extra = 0.0 if explicit else backend.pick(compiled=NOISE_ATOL, triton=0.0)

    def body(shape, seed, offset, data_seed):
        B, n = shape
        gen = torch.Generator().manual_seed(data_seed)
        p, x0 = rand((B, n), dtype, gen, scale=1.3, device=dev), rand((B, n), dtype, gen, device=dev)
        eps = rand((B, n), dtype, gen, device=dev) if explicit else eps_of(seed, offset, B, n, dev)
        t = torch.randint(0, sched.T, (B,), generator=gen).to(dev)
        coef = operands.prediction_coefficients(sched, prediction_type, t, p)
        assert coef.shape == (5, B) and coef.dtype == a
        e_arg = eps if explicit else None
        s, o = noise.to_signed(seed), noise.to_signed(offset)
        sse, ssq = backend.ops.iso_sums(p, e_arg, s, o, x0, coef)
        r, h = _affine_terms_expr(p, eps, x0, coef)
        k = coef.abs().max().item()
        sum_tol = backend.pick(compiled=(1e-12, 1e-12) if dtype == torch.float64 else (2e-6, 1e-5), triton=(1e-5, 1e-5))
        close(sse, (r**2).sum(1), sum_tol, extra_atol=(2 * k * extra * r.abs().sum(1)).max().item() + k * extra)
        close(ssq, (h**2).sum(1), sum_tol, extra_atol=(2 * k * extra * h.abs().sum(1)).max().item() + k * extra)
        c1, c2 = rand(B, a, gen, device=dev), rand(B, a, gen, device=dev)
        g = backend.ops.iso_grad(p, e_arg, s, o, c1, c2, x0, coef)
        want = c1.double()[:, None] * r + (c2.double() * coef[2].double())[:, None] * h
        assert g.dtype == dtype and g.shape == (B, n)
        # the terms carry coefficients up to sqrt(snr) ~ 1e2: tolerances relative to their size
        size = (c1.double().abs()[:, None] * (p.double().abs() + k * (eps.double().abs() + x0.double().abs())) * (1 + k**2))
        rtol, atol = PRIMITIVE_TOL[backend.family][dtype]
        assert ((g.double() - want).abs() <= rtol * want.abs() + 4 * atol * size + 4 * k**2 * extra).all()

    check(backend.pick(compiled=8, triton=3), body, EDGE_EXAMPLES, shape=PRIMITIVE_SHAPES[backend.family],
          seed=KEYS, offset=KEYS, data_seed=st.integers(0, 2**31))


def test_primitives_take_x0_and_coef_together_or_not_at_all(backend):
    dev = backend.device
    p = torch.randn(2, 5, device=dev)
    coef = torch.ones(5, 2, device=dev)
    for args in ((p, None), (None, coef)):
        with pytest.raises((RuntimeError, ValueError), match="x0 and coef"):
            backend.ops.iso_sums(p, None, 0, 0, *args)
    with pytest.raises((RuntimeError, ValueError), match="coef"):
        backend.ops.iso_sums(p, None, 0, 0, p, torch.ones(4, 2, device=dev))


@on("cpu", "cuda")
@pytest.mark.parametrize("with_e", [False, True], ids=["keyed", "explicit"])
def test_compiled_iso_sums_with_x0_and_coef_gradcheck(backend, with_e):
    # C++ autograd: dp = iso_grad(..., x0, coef), de = 2 g_sse (-coef0) r + 2 g_ssq coef3 h
    dev, f64 = backend.device, torch.float64
    B, n, seed, offset = 3, 7, 2**40 + 3, 5
    gen, p, e, inputs = _grad_operands(backend, f64, 18, B, n, with_e)
    x0, coef = rand((B, n), f64, gen, device=dev), rand((5, B), f64, gen, device=dev)
    op = torch.ops.isofast_C.iso_sums
    assert torch.autograd.gradcheck(lambda q, *z: op(q, z[0] if z else None, seed, offset, x0, coef), inputs)
    with pytest.raises(RuntimeError, match="constants"):
        op(p, e, seed, offset, x0.requires_grad_(), coef)


@on("triton")
@pytest.mark.parametrize("with_e", [False, True], ids=["keyed", "explicit"])
def test_triton_iso_sums_with_x0_and_coef_gradient_equals_formula_autograd(backend, with_e):
    dev = backend.device
    B, n, seed, offset = 3, 37, 2**63 + 1, 2**32 - 1
    gen, p, e, inputs = _grad_operands(backend, torch.float32, 19, B, n, with_e)
    x0, coef = rand((B, n), torch.float32, gen, device=dev), rand((5, B), torch.float32, gen, device=dev)
    eps = e if with_e else eps_of(seed, offset, B, n, dev)
    u1, u2 = rand(B, torch.float32, gen, device=dev), rand(B, torch.float32, gen, device=dev)
    sse, ssq = backend.ops.iso_sums(p, e, noise.to_signed(seed), noise.to_signed(offset), x0, coef)
    got = torch.autograd.grad((sse * u1 + ssq * u2).sum(), inputs)
    k = coef.unsqueeze(2)
    r, h = p - (k[0] * eps + k[1] * x0), k[2] * p + k[3] * eps + k[4] * x0
    want = torch.autograd.grad(((r**2).sum(1) * u1 + (h**2).sum(1) * u2).sum(), inputs)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def _noised(shape, dtype, dev, seed=7, T=1000, t=None):
    """(sched, x0, t, x_t, key with context) of a q_sample on the reference: the same numbers on every backend."""
    gen = torch.Generator().manual_seed(seed)
    sched = NoiseSchedule.linear(T)
    x0 = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(dev)
    t = torch.randint(0, T, (shape[0],), generator=gen) if t is None else t
    x_t, key = isofast.q_sample(x0, t.to(dev), sched, NoiseKey(seed, 2**32 + 1, shape, dtype, dev), backend="reference")
    return sched, x0, t.to(dev), x_t, key


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_public_loss_of_each_prediction_type_equals_reference(backend, dtype, prediction_type):
    # the key q_sample returned carries x0, t and the schedule; groups (an ensemble) keep working
    backend.skip_unless_takes(dtype)
    dev = backend.device
    shape = (4, 3, 5)
    sched, x0, t, x_t, key = _noised(shape, dtype, dev)
    assert key.x0 is x0 and key.schedule is sched and torch.equal(key.t, t)
    for mode, reduction, groups, gamma in (("batch", "mean", 1, None), ("sample", "none", 2, 5.0),
                                           ("batch", "sum", 2, 1.0), ("sample", "mean", 1, 5.0)):
        results = []
        for name in (backend.name, "reference"):
            p = (1.1 * x0.double() + 0.2).to(dtype).requires_grad_()
            loss, parts = isofast.iso_ddpm_loss(p, key, 0.3, mode, None, reduction, True, name, groups,
                                                prediction_type=prediction_type, snr_gamma=gamma)
            (loss * torch.linspace(0.5, 1.5, loss.numel(), device=dev).reshape(loss.shape)).sum().backward()
            results.append((loss.detach(), *parts, p.grad))
        rtol, atol = LOSS_TOL[dtype]
        what = f"{prediction_type} {mode}/{reduction}/groups={groups}/snr_gamma={gamma}"
        for got, want in zip(*results, strict=True):
            close(got, want, (rtol, atol), extra_atol=1e-3 * want.abs().max().item() + 4 * NOISE_ATOL, msg=what)


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_a_perfect_prediction_has_no_error_and_implies_the_true_noise(backend, prediction_type):
    # pred = the target: mse 0, and the implied eps is the noise itself, so the isotropy is that of eps
    dev = backend.device
    shape = (3, 4, 6)
    sched, x0, t, x_t, key = _noised(shape, torch.float32, dev, seed=3)
    eps = key.materialize(torch.float64).cpu()
    s = sched.exact("sqrt_alphas_cumprod")[t.cpu()].reshape(-1, 1, 1)
    sigma = sched.exact("sqrt_one_minus_alphas_cumprod")[t.cpu()].reshape(-1, 1, 1)
    target = s * eps - sigma * x0.double().cpu() if prediction_type == "v_prediction" else x0.double().cpu()
    _, parts = isofast.iso_ddpm_loss(target.float().to(dev), key, 0.3, return_parts=True, backend=backend.name,
                                     prediction_type=prediction_type)
    assert parts.mse.item() < 1e-9 * (1 + (s / sigma).max().item() ** 2)
    torch.testing.assert_close(parts.isotropy.double().cpu(), isofast.isotropy(eps), rtol=1e-4, atol=1e-4)


def test_x0_prediction_near_t_0_is_finite_and_equals_the_float64_reference(backend):
    # 1 - ab_0 = 1e-4 on the linear schedule: eps_hat = eps + 100 (x0 - x0_hat) (the loss's docstring)
    dev = backend.device
    shape = (2, 8)
    sched, x0, t, x_t, key = _noised(shape, torch.float32, dev, t=torch.tensor([0, 1]))
    p = (x0 + 0.01).requires_grad_()
    loss = isofast.iso_ddpm_loss(p, key, 0.3, backend=backend.name, prediction_type="sample")
    loss.backward()
    p64 = p.detach().double().cpu().requires_grad_()
    want, _ = reference.iso_ddpm_loss(p64, key.materialize(torch.float64).cpu(), 0.3, prediction_type="sample",
                                      x0=x0.double().cpu(), t=t.cpu(), sched=sched)
    want.backward()
    assert torch.isfinite(loss) and torch.isfinite(p.grad).all()
    torch.testing.assert_close(loss.double().cpu(), want, rtol=1e-4, atol=0)
    torch.testing.assert_close(p.grad.double().cpu(), p64.grad, rtol=1e-3, atol=1e-3 * p64.grad.abs().max().item())


def test_keywords_give_what_the_key_carries_and_override_it(backend):
    dev = backend.device
    shape = (2, 3, 4)
    sched, x0, t, x_t, key = _noised(shape, torch.float32, dev, seed=5)
    p = torch.randn(shape, device=dev)
    eps = key.materialize(torch.float32)
    by_key = isofast.iso_ddpm_loss(p, key, backend=backend.name, prediction_type="v_prediction", snr_gamma=5.0)
    by_words = isofast.iso_ddpm_loss(p, eps, backend=backend.name, prediction_type="v_prediction", snr_gamma=5.0,
                                     x0=x0, t=t, schedule=sched)
    close(by_key, by_words, (1e-5, 4 * NOISE_ATOL))
    # an explicit keyword wins over the key's context
    other = isofast.iso_ddpm_loss(p, key, backend=backend.name, prediction_type="v_prediction", t=t.flip(0))
    want = isofast.iso_ddpm_loss(p, eps, backend="reference", prediction_type="v_prediction", x0=x0, t=t.flip(0),
                                 schedule=sched)
    close(other, want, (1e-5, 4 * NOISE_ATOL))


def test_eps_prediction_passes_no_x0_or_coefficients_to_the_primitives(backend, monkeypatch):
    # the eps path stays the two-operand kernels: no x0 read, even when the key carries x0
    calls, library = [], backends.library

    class Library:
        def __init__(self, name):
            self.ops = library(name)

        def __getattr__(self, primitive):
            op = getattr(self.ops, primitive)

            def recording(*args):
                calls.append((primitive, len(args)))
                return op(*args)

            return recording

    monkeypatch.setattr(backends, "library", Library)
    _, _, _, _, key = _noised((2, 5), torch.float32, backend.device)
    isofast.iso_ddpm_loss(torch.randn(2, 5, device=backend.device), key, backend=backend.name, snr_gamma=5.0)
    assert calls == [("iso_sums", 4)]


@pytest.mark.parametrize("prediction_type", ("epsilon", "v_prediction", "sample"))
def test_min_snr_weights_equal_diffusers(prediction_type):
    # diffusers' training scripts: min(snr, gamma) / snr (epsilon), / (snr + 1) (v_prediction), unchanged (sample)
    training_utils = pytest.importorskip("diffusers.training_utils")
    sched = NoiseSchedule.linear(1000)
    scheduler = sched.to_diffusers()
    scheduler.alphas_cumprod = sched.exact("alphas_cumprod")  # diffusers keeps float32; compare the formula in float64
    t = torch.tensor([0, 1, 10, 100, 400, 999])
    gamma = 5.0
    snr = training_utils.compute_snr(scheduler, t).double()
    want = torch.stack([snr, gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    if prediction_type == "epsilon":
        want = want / snr
    elif prediction_type == "v_prediction":
        want = want / (snr + 1)
    got = reference.min_snr_weights(reference.snr(t, sched), gamma, prediction_type)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)  # compute_snr rounds to float32
    # and the loss uses them as weights
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    e = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    kw = dict(prediction_type=prediction_type, x0=x, t=t, schedule=sched)
    weighted = isofast.iso_ddpm_loss(e + 0.1, e, 0.3, "sample", snr_gamma=gamma, **kw)
    plain = isofast.iso_ddpm_loss(e + 0.1, e, 0.3, "sample", weights=want.float(), **kw)
    torch.testing.assert_close(weighted, plain, rtol=1e-5, atol=0)


def test_prediction_type_bad_context_names_what_is_missing(backend):
    dev = backend.device
    p = torch.randn(2, 3, device=dev)
    hand_made = NoiseKey(1, 0, (2, 3), device=dev)
    for kwargs, word in ((dict(prediction_type="v_prediction"), "schedule"),
                         (dict(prediction_type="sample", schedule=NoiseSchedule.linear(10)), "t"),
                         (dict(prediction_type="sample", schedule=NoiseSchedule.linear(10), t=1), "x0"),
                         (dict(snr_gamma=5.0), "schedule"),
                         (dict(prediction_type="x0"), "prediction_type"),
                         (dict(snr_gamma=0.0), "snr_gamma")):
        with pytest.raises(ValueError, match=rf"\b{word}\b"):
            isofast.iso_ddpm_loss(p, hand_made, backend=backend.name, **kwargs)
    _, _, _, _, key = _noised((2, 3), torch.float32, dev, T=20)
    with pytest.raises(ValueError, match="T=10"):  # the key's t belongs to a schedule of another length
        isofast.iso_ddpm_loss(p, key, backend=backend.name, prediction_type="sample", schedule=NoiseSchedule.linear(10))


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_gradient_flows_into_an_x0_that_requires_grad(backend, prediction_type):
    # the fused primitives treat x0 as a constant: such a call takes the reference path
    dev = backend.device
    sched, x0, t, x_t, key = _noised((2, 6), torch.float32, dev)
    grads = []
    for name in (backend.name, "reference"):
        x = x0.detach().clone().requires_grad_()
        isofast.iso_ddpm_loss(torch.randn(2, 6, generator=torch.Generator().manual_seed(2)).to(dev), key,
                              backend=name, prediction_type=prediction_type, x0=x).backward()
        grads.append(x.grad)
    assert grads[0] is not None and torch.count_nonzero(grads[0]) > 0
    torch.testing.assert_close(grads[0], grads[1])
