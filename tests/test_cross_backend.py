"""Cross-backend agreement: with the same key, the compiled CPU kernels, the Triton kernels (under
the interpreter on a CPU, for real on a GPU) and the reference draw the same eps (integers exact,
normals within a few ulp) and give the same loss and gradient.
"""
from __future__ import annotations

import pytest
import torch

import isofast
from isofast import NoiseKey, noise
from isofast.ops import backends

if not backends.usable("cpu"):
    pytest.skip("isofast._C is not built", allow_module_level=True)
if not backends.usable("triton"):
    pytest.skip(f"Triton backend unavailable: {backends.status('triton')[1]}", allow_module_level=True)

from isofast.kernels.philox import contract_draw  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NORMAL_ATOL = 4e-6  # each generator vs the reference (ARCHITECTURE.md, noise contract step 3)
KEYS = [(0, 0), (12345, 3), (2**40 + 9, 2**32 - 37), (2**64 - 1, 2**64 - 37), (2**63 + 5, 2**63)]


@pytest.mark.parametrize("seed,offset", KEYS)
def test_same_eps_on_every_backend(seed, offset):
    numel = 1001  # not a multiple of 4: the last Philox call is partly used
    s, o = noise.to_signed(seed), noise.to_signed(offset)
    ref_words = noise.randint_contract(seed, offset, numel)
    ref = noise.randn_contract(seed, offset, numel)

    cpu_words = torch.ops.isofast_C.philox_bits(torch.empty(numel), s, o).reshape(-1)[:numel]
    tri_normals, tri_words = contract_draw(seed, offset, numel, DEVICE)
    assert torch.equal(cpu_words.to(torch.int64) & noise.MASK32, ref_words)
    assert torch.equal(tri_words.cpu().to(torch.int64) & noise.MASK32, ref_words)

    # The eps the loss kernels themselves generate: iso_grad with p = 0, c1 = -1, c2 = 0 writes eps.
    B, n = 7, 143
    assert B * n == numel
    drawn = {}
    for name, device in (("cpu", "cpu"), ("triton", DEVICE)):
        p = torch.zeros(B, n, device=device)
        c1, c2 = -torch.ones(B, device=device), torch.zeros(B, device=device)
        drawn[name] = backends.kernels(name).iso_grad(p, None, s, o, c1, c2).reshape(-1).cpu()
    for got in (drawn["cpu"], drawn["triton"], tri_normals.cpu(),
                torch.ops.isofast_C.philox_randn(torch.empty(numel), s, o)):
        torch.testing.assert_close(got, ref, rtol=0, atol=NORMAL_ATOL)
    torch.testing.assert_close(drawn["cpu"], drawn["triton"], rtol=0, atol=2 * NORMAL_ATOL)


@pytest.mark.parametrize("mode,reduction", [("batch", "mean"), ("batch", "sum"), ("sample", "mean"), ("sample", "none")])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("seed,offset", KEYS[2:4])
def test_same_noising_loss_and_gradient_on_every_backend(mode, reduction, weighted, seed, offset):
    shape = (3, 2, 5, 7)
    g = torch.Generator().manual_seed(seed % 1000)
    x0 = torch.randn(shape, generator=g)
    p0 = 1.2 * torch.randn(shape, generator=g)
    t = torch.randint(0, 1000, (shape[0],), generator=g)
    w = torch.rand(shape[0], generator=g) + 0.5 if weighted else None
    upstream = torch.randn(shape[0] if reduction == "none" else (), generator=g)
    sched = isofast.NoiseSchedule.linear(1000)
    out = {}
    for backend in ("cpu", "triton", "reference"):
        device = DEVICE if backend == "triton" else "cpu"
        key = NoiseKey(seed=seed, offset=offset, shape=shape, device=device)
        x_t, _ = isofast.q_sample(x0.to(device), t.to(device), sched, key, backend=backend)
        p = p0.to(device).requires_grad_()
        loss = isofast.iso_ddpm_loss(p, key, 0.3, mode, None if w is None else w.to(device), reduction, backend=backend)
        (loss * upstream.to(device)).sum().backward()
        out[backend] = (x_t.cpu(), loss.detach().cpu(), p.grad.cpu())
    for backend in ("cpu", "triton"):
        for name, got, want in zip(("x_t", "loss", "grad"), out[backend], out["reference"], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5, msg=lambda m, b=backend, n=name: f"{b} {n}: {m}")
