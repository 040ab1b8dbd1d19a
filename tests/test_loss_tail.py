"""The loss's O(B) tail of the fused path (isofast/ops/iso_loss.py): from the per-sample sums to the
loss, its parts and the backward coefficients.

Two implementations: torch ops (`_tail` on non-CPU tensors, closed-form slopes `_slopes`) and the
compiled CPU op ``isofast_C::iso_loss_tail``. The torch one is held to autograd of the oracle's
`reference.loss_from_terms`; the compiled one to the torch one. Then the public loss, with weights
that require grad and a random upstream gradient, against the reference on every path.
"""
from __future__ import annotations

import itertools

import pytest
import torch

import isofast
from isofast import NoiseKey, reference
from isofast.ops import backends
from isofast.ops import iso_loss as loss_mod

CASES = [(m, r) for m, r in itertools.product(("batch", "sample"), ("mean", "sum", "none")) if (m, r) != ("batch", "none")]
needs_compiled = pytest.mark.skipif(not backends.usable("cpu"), reason="isofast._C is not built")


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


@needs_compiled
@pytest.mark.parametrize("mode,reduction", CASES)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B", [1, 3, 64])
def test_compiled_tail_equals_torch_tail(monkeypatch, mode, reduction, weighted, dtype, B):
    n, lam = 3072, 0.3
    sse, ssq, w = _sums(B, n, dtype, B)
    got = loss_mod._tail(sse, ssq, n, w if weighted else None, lam, mode, reduction)
    monkeypatch.setattr(backends, "usable", lambda name: False)
    want = loss_mod._tail(sse, ssq, n, w if weighted else None, lam, mode, reduction)
    # float32: the torch ops round (S - 1) in float32 (the compiled op works in float64), so the
    # small batch penalty (S - 1)^2 agrees to an absolute, not a relative, tolerance.
    rtol, atol = (1e-12, 1e-15) if dtype == torch.float64 else (2e-6, 1e-7)
    for name, g, e in zip(("loss", "mse", "iso", "isotropy", "k1", "k2", "d_w"), got, want, strict=True):
        assert g.dtype == dtype and g.shape == e.shape, name
        torch.testing.assert_close(g, e, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


@needs_compiled
def test_compiled_tail_rejects_bad_arguments():
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


def _paths():
    paths = [("reference", False)]
    if backends.usable("cpu"):
        paths += [("cpu", False), ("cpu", True)]  # True: the torch tail with the compiled kernels
    return paths


@pytest.mark.parametrize("mode,reduction", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("keyed", [False, True])
def test_public_loss_weights_and_upstream_gradient(monkeypatch, mode, reduction, dtype, keyed):
    """Gradients of eps_pred and of weights that require grad, under a random upstream gradient."""
    shape = (4, 3, 5)
    g = torch.Generator().manual_seed(7)
    p0 = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    w0 = (torch.rand(4, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    key = NoiseKey(seed=99, offset=3, shape=shape, dtype=dtype)
    eps = key.materialize(dtype) if not keyed else key
    upstream = torch.randn(4 if reduction == "none" else (), generator=g, dtype=torch.float64).to(dtype)
    results = {}
    for backend, torch_tail in _paths():
        with monkeypatch.context() as m:
            if torch_tail:
                m.setattr(backends, "usable", lambda name: False)
            p, w = p0.clone().requires_grad_(), w0.clone().requires_grad_()
            loss = isofast.iso_ddpm_loss(p, eps, 0.4, mode, w, reduction, backend=backend)
            (loss * upstream).sum().backward()
            results[(backend, torch_tail)] = (loss.detach(), p.grad, w.grad)
    want = results.pop(("reference", False))
    # Keyed: the reference materialises the contract's normals, the kernels generate their own (a few ulp apart).
    tol = 1e-10 if dtype == torch.float64 and not keyed else 2e-5
    for path, got in results.items():
        for name, a, b in zip(("loss", "grad eps_pred", "grad weights"), got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m, name=name, path=path: f"{path} {name}: {m}")


@needs_compiled
def test_public_loss_gradcheck_in_weights_float64():
    shape = (3, 4)
    key = NoiseKey(seed=5, offset=0, shape=shape, dtype=torch.float64)
    p = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    for mode, reduction in CASES:
        def f(x, weights, mode=mode, reduction=reduction):
            return isofast.iso_ddpm_loss(x, key, 0.7, mode, weights, reduction, backend="cpu")

        assert torch.autograd.gradcheck(f, (p, w))
