"""EnsembleAdam.fused_step (csrc/cpu/adam.cpp) against torch.optim.Adam, element by element: the ensemble's
members must stay bitwise the runs torch's Adam trains (with per-member clipping and the EMA folded in)."""
from __future__ import annotations

import pytest
import torch

from isofast.ensemble_adam import EnsembleAdam

pytestmark = pytest.mark.skipif(not EnsembleAdam.fused_available(), reason="isofast._C (CPU kernels) not built")


def _grads(shapes, gen):
    # magnitudes over eight decades: Adam's sqrt and eps matter at the small end, the clipping at the large;
    # every fifth element 0 at every step, a dead unit's: its second moment stays exactly 0 (the kernel
    # keeps zeros away from torch's sqrt, which is slow on them)
    grads = [torch.randn(s, generator=gen) * 10.0 ** torch.randint(-6, 2, s, generator=gen).float() for s in shapes]
    for g in grads:
        g.view(-1)[::5] = 0
    return grads


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("ema_weight", [None, 0.001, 0.5, 0.9])  # both branches of ATen's lerp
@pytest.mark.parametrize("threads", [1, 2])
def test_fused_step_is_torch_adam_bitwise(clip, ema_weight, threads):
    gen = torch.Generator().manual_seed(7)
    members = 5
    # the ensemble's shapes and odd ones (vector body and scalar tail; one tensor larger than a parallel grain)
    shapes = [(members, 2, 128), (members, 1, 128), (members, 128, 2), (members, 1, 2), (members, 3, 7),
              (members, 1, 1), (members, 9001)]
    start = [torch.randn(s, generator=gen) for s in shapes]
    ref = [p.clone().requires_grad_() for p in start]
    got = [p.clone().requires_grad_() for p in start]
    ema_ref, ema_got = [p.clone() for p in start], [p.clone() for p in start]
    torch_adam = torch.optim.Adam(ref, lr=2e-3, betas=(0.9, 0.99), eps=1e-8)
    fused = EnsembleAdam(got, lr=2e-3, betas=(0.9, 0.99), eps=1e-8)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(5):
            grads = _grads(shapes, gen)
            scale = (torch.rand(members, generator=gen) * 1.5).clamp(max=1.0) if clip else None
            for p, g in zip(ref, grads, strict=True):
                p.grad = g * scale.view(-1, *([1] * (g.ndim - 1))) if clip else g.clone()
            for p, g in zip(got, grads, strict=True):
                p.grad = g.clone()
            torch_adam.step()
            if ema_weight is not None:
                torch._foreach_lerp_(ema_ref, [p.detach() for p in ref], ema_weight)
            fused.fused_step(scale, ema_got if ema_weight is not None else (), ema_weight or 0.0)
            for g, p in zip(grads, got, strict=True):
                assert torch.equal(p.grad, g)  # the gradients are left as they were
    finally:
        torch.set_num_threads(before)
    assert any((torch_adam.state[a]["exp_avg_sq"] == 0).any() for a in ref)  # the dead units' moments
    for a, b in zip(ref, got, strict=True):
        assert torch.equal(a, b)
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(torch_adam.state[a][key], fused.state[b][key]), key
    if ema_weight is not None:
        assert all(torch.equal(a, b) for a, b in zip(ema_ref, ema_got, strict=True))
    # the state is torch's: it loads into a torch Adam and back
    torch.optim.Adam(ref, lr=2e-3).load_state_dict(fused.state_dict())


def test_fused_step_refuses_what_it_cannot_compute():
    p = torch.zeros(3, 4, requires_grad=True)
    opt = EnsembleAdam([p], lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    p.grad = torch.ones(3, 4, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="scale must be a contiguous float32"):
        opt.fused_step(torch.ones(3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="members"):
        opt.fused_step(torch.ones(2))
    with pytest.raises(ValueError, match="ema must be empty or hold one tensor per parameter"):
        opt.fused_step(None, [torch.zeros(3, 4), torch.zeros(3, 4)], 0.1)
    with pytest.raises(RuntimeError, match=r"ema\[0\] must be a contiguous float32 CPU tensor, got Double"):
        opt.fused_step(None, [torch.zeros(3, 4, dtype=torch.float64)], 0.1)
    with pytest.raises(RuntimeError, match=r"ema\[0\] .*\(not contiguous\)"):
        opt.fused_step(None, [torch.zeros(4, 3).t()], 0.1)
    assert not opt.state[p] or float(opt.state[p]["step"]) == 0  # a refused step changes nothing
    assert not opt.state[p] or opt.state[p]["exp_avg"].abs().sum() == 0
    assert p.abs().sum() == 0
    q = torch.zeros(3, 4, dtype=torch.float64, requires_grad=True)
    q.grad = torch.ones(3, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"params\[0\] must be a contiguous float32 CPU tensor"):
        EnsembleAdam([q], lr=1e-3, betas=(0.9, 0.999), eps=1e-8).fused_step()


def test_subnormal_moments_flush_to_zero_and_the_weights_stay_torchs():
    """A dead unit's first moment decays into the subnormal range, where x86 arithmetic takes microcode assists
    (2.7x slower steps in the paper's sweep): the kernel flushes such moments to 0 where torch keeps them. The
    weights stay bitwise torch's, and the caller's threads keep IEEE subnormals afterwards."""
    torch.manual_seed(0)
    ref = [torch.randn(3, 5, 4).requires_grad_()]
    got = [ref[0].detach().clone().requires_grad_()]
    torch_adam = torch.optim.Adam(ref, lr=1e-3, foreach=False)
    fused = EnsembleAdam(got, lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    first, later = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    later[0] = 0  # member 0's gradient stays 0 from the second step on
    for opt, params in ((torch_adam, ref), (fused, got)):
        params[0].grad = first.clone()
        opt.step() if opt is torch_adam else opt.fused_step()
        opt.state[params[0]]["exp_avg"][0, 0].fill_(3e-39)  # subnormal moments, as after ~800 steps of zero grad
        params[0].grad = later.clone()
    for _ in range(3):
        torch_adam.step()
        fused.fused_step()
    assert torch.equal(ref[0], got[0])
    m_torch, m_fused = torch_adam.state[ref[0]]["exp_avg"], fused.state[got[0]]["exp_avg"]
    assert (m_torch[0, 0] != 0).all() and (m_fused[0, 0] == 0).all()  # torch keeps them, the kernel flushes
    assert torch.equal(m_torch[1:], m_fused[1:])
    assert (torch.full((4,), 1e-39) * 1.5 != 0).all()  # this thread's subnormals are back
