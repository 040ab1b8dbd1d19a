"""Triton only: the launch settings (row windows) at the GPU's block sizes, the selfcheck, and an
ahead-of-time sm_90 compile of every kernel (what the interpreter cannot see).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import eps_of, on

from isofast.noise import to_signed

pytestmark = on("triton")


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 13, 16, 64, 70, 301, 2048, 4100, 12288, 196608, 196609])
def test_gpu_settings_windows_cover_every_row_exactly(backend, n, monkeypatch):
    from isofast.kernels import settings

    monkeypatch.setattr(settings, "interpreting", lambda: False)
    cfg = settings.calculate_settings(n)
    assert cfg.block & (cfg.block - 1) == 0 and cfg.block >= 16 and cfg.num_warps in (1, 2, 4, 8)
    for b in range(6):  # the row_window arithmetic: aligned-down start, nwin windows of block
        row_start = b * n
        base = row_start // 4 * 4
        covered = base + cfg.nwin * cfg.block - row_start
        assert covered >= n, (b, cfg)
        assert base + (cfg.nwin - 1) * cfg.block < row_start + n  # no window wholly past the row


@pytest.mark.parametrize("n", [2, 13, 64, 301, 4100])
def test_kernels_with_gpu_block_sizes(backend, n, monkeypatch):
    """The GPU launch configurations (bigger blocks, one window or several) in the interpreter."""
    from isofast.kernels import settings

    monkeypatch.setattr(settings, "interpreting", lambda: False)
    dev = backend.device
    batch, seed, offset = 3, 2**64 - 9, 2**32 + 1
    p = torch.randn(batch, n, device=dev)
    eps = eps_of(seed, offset, batch, n, dev)
    sse, ssq = backend.ops.iso_sums(p, None, to_signed(seed), to_signed(offset))
    torch.testing.assert_close(sse.double(), ((p.double() - eps.double()) ** 2).sum(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ssq.double(), (p.double() ** 2).sum(1), rtol=1e-5, atol=1e-6)
    c1, c2 = torch.randn(batch, device=dev), torch.randn(batch, device=dev)
    g = backend.ops.iso_grad(p, None, to_signed(seed), to_signed(offset), c1, c2)
    torch.testing.assert_close(g, c1[:, None] * (p - eps) + c2[:, None] * p, rtol=1e-5, atol=1e-6)


def test_selfcheck_passes_kernels_and_flags_a_wrong_one(backend, monkeypatch):
    from isofast import selfcheck

    results = selfcheck.check_backend("triton", backend.device.type, 2, (1, 3, 3), (torch.float32,))
    assert len(results) == len(selfcheck._cases()) and all(r.passed for r in results), results
    # a wrong iso_grad op (what the loss's autograd calls): the loss fails, q_sample still passes
    wrong = torch.ops.isofast_triton.iso_grad
    monkeypatch.setattr(torch.ops.isofast_triton, "iso_grad",
                        lambda p, e, s, o, c1, c2, *affine: 1.001 * wrong(p, e, s, o, c1, c2, *affine))
    results = {r.op: r for r in selfcheck.check_backend("triton", backend.device.type, 2, (1, 3, 3), (torch.float32,))}
    assert not results["loss batch (key) fwd+bwd"].passed and results["q_sample (key)"].passed
    v_case = results["loss batch v-pred min-SNR (key) fwd+bwd"]
    assert not v_case.passed and v_case.error is not None  # a wrong gradient, not a crash


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the GPU runs the kernels themselves")
def test_kernels_compile_for_sm90_without_a_gpu(backend):
    """The interpreter cannot see GPU lowering errors: compile every kernel to an sm_90 cubin."""
    code = ("from isofast.selfcheck import compile_check\n"
            "bad = [r for r in compile_check(90, ('fp32',)) if not r.passed]\n"
            "print(bad)\nraise SystemExit(1 if bad else 0)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
