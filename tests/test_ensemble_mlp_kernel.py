"""The fused CPU forward of the stacked ensemble with one timestep per member (sampling): `predict_shared_t`
equals `forward_shared_t` (the batched matmuls) and each member's own model, for random shapes; bad input to
the op is refused with the argument named."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from isofast import ensemble_models
from isofast.ensemble_models import stack_members
from isofast.models.authors_mlp import AuthorsMLP
from isofast.models.mlp import TimeMLP
from isofast.ops import extension

ROOT = Path(__file__).resolve().parents[1]
needs_cpu_kernels = pytest.mark.skipif(not extension.available("cpu")[0], reason="isofast._C (CPU kernels) not built")


@needs_cpu_kernels
@pytest.mark.parametrize("kind", [TimeMLP, AuthorsMLP])
@pytest.mark.parametrize("case", range(4))
def test_fused_forward_equals_batched_matmuls_and_each_member(kind, case):
    gen = torch.Generator().manual_seed(case)
    members = int(torch.randint(1, 5, (1,), generator=gen))
    rows = [1, 251, 252, 253, 700][int(torch.randint(0, 5, (1,), generator=gen))]  # around the kernel's block
    hidden, layers = [(128, 3), (16, 1), (40, 2), (64, 4)][case]
    torch.manual_seed(case)
    models = [kind(hidden=hidden, n_layers=layers) for _ in range(members)]
    ens = stack_members(models)
    x = torch.randn(members, rows, 2, generator=gen)
    t = torch.randint(0, 1000, (members,), generator=gen)
    got = ens.predict_shared_t(x, t)
    assert got.shape == (members, rows, 2) and not got.requires_grad
    torch.testing.assert_close(got, ens.forward_shared_t(x, t), rtol=1e-5, atol=1e-6)
    for m, model in enumerate(models):
        torch.testing.assert_close(got[m], model(x[m], torch.full((rows,), int(t[m]))), rtol=1e-5, atol=1e-6)


@needs_cpu_kernels
def test_portable_and_avx512_forwards_agree(tmp_path):
    """ISOFAST_NO_AVX512=1 (read once per process) takes the sgemm path that CPUs without AVX-512 run: in a
    subprocess, it equals the batched matmuls as the default path does, on widths that fill part of a register
    (40: 16 + 16 + 8 lanes) and of a 64-column panel, and on rows around the 6-row tile."""
    code = textwrap.dedent("""
        import sys, torch
        from isofast.ensemble_models import stack_members
        from isofast.models.mlp import TimeMLP
        from isofast.ops import extension
        torch.manual_seed(0)
        out = {"isa": extension._C.sampler_isa()}
        for hidden, layers, rows in ((40, 2, 13), (128, 3, 257), (72, 1, 5)):
            ens = stack_members([TimeMLP(hidden=hidden, n_layers=layers) for _ in range(3)])
            x, t = torch.randn(3, rows, 2), torch.tensor([0, 400, 999])
            out[hidden] = (ens.predict_shared_t(x, t), ens.forward_shared_t(x, t))
        torch.save(out, sys.argv[1])
    """)
    got = {}
    for name, extra in (("default", {}), ("portable", {"ISOFAST_NO_AVX512": "1"})):
        path = tmp_path / f"{name}.pt"
        subprocess.run([sys.executable, "-c", code, str(path)], check=True, env={**os.environ, **extra}, cwd=ROOT)
        got[name] = torch.load(path)
    assert got["portable"]["isa"] == "sgemm"
    assert got["default"]["isa"] == ("AVX-512" if _cpu_has_avx512() else "sgemm")
    for name in ("default", "portable"):
        for hidden in (40, 128, 72):
            fused, batched = got[name][hidden]
            torch.testing.assert_close(fused, batched, rtol=1e-5, atol=1e-6)


def _cpu_has_avx512() -> bool:
    """The flags of x86-64-v4, the level isofast's AVX-512 paths require (cpu_common.h: use_avx512)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"} <= flags


def test_unfused_path_equals_forward(monkeypatch):
    """Without the compiled kernel (or off the CPU) predict_shared_t runs the batched matmuls in row chunks."""
    torch.manual_seed(0)
    ens = stack_members([TimeMLP() for _ in range(2)])
    x, t = torch.randn(2, 600, 2), torch.tensor([3, 500])
    monkeypatch.setattr(extension, "available", lambda name: (False, "disabled for the test"))
    torch.testing.assert_close(ens.predict_shared_t(x, t), ens.forward_shared_t(x, t), rtol=1e-5, atol=1e-6)
    assert ensemble_models._SAMPLE_CHUNK < 600  # the chunked path was taken more than once


@needs_cpu_kernels
def test_fused_forward_refuses_bad_input():
    op = torch.ops.isofast_C.ensemble_mlp_forward
    x = torch.randn(3, 10, 2)
    w0, b0 = torch.randn(3, 8, 2), torch.randn(3, 1, 8)  # weights as nn.Linear's, (M, out, in)
    w1, b1 = torch.randn(3, 2, 8), torch.randn(3, 1, 2)
    assert op(x, [w0, w1], [b0, b1]).shape == (3, 10, 2)
    with pytest.raises(RuntimeError, match=r"weights\[1\] must be a float32 CPU tensor \(3, out, 8\)"):
        op(x, [w0, torch.randn(3, 2, 7)], [b0, b1])
    with pytest.raises(RuntimeError, match=r"weights\[0\] must be a float32 CPU tensor \(3, out, 2\)"):
        op(x, [torch.randn(2, 8, 2), w1], [b0, b1])  # another member count
    with pytest.raises(RuntimeError, match=r"biases\[0\] must be a float32 CPU tensor \(3, 1, 8\)"):
        op(x, [w0, w1], [torch.randn(3, 10, 8), b1])  # per-row terms are not this op's
    with pytest.raises(RuntimeError, match="one tensor per layer"):
        op(x, [w0, w1], [b0])
    with pytest.raises(RuntimeError, match=r"x must be a float32 CPU tensor \(M, N, d\)"):
        op(x.double(), [w0, w1], [b0, b1])
    with pytest.raises(RuntimeError, match=r"weights\[0\] must be a float32"):
        op(x, [w0.double(), w1], [b0, b1])


def _grads_of_each_member(models, x, t, g):
    out = []
    for m, model in enumerate(models):
        model.zero_grad()
        model(x[m], t[m]).backward(g[m])
        grads = {}
        for i, (layer, proj) in enumerate(zip(model.layers, model.time_proj, strict=True)):
            grads[f"weight.{i}"], grads[f"bias.{i}"] = layer.weight.grad, layer.bias.grad[None]
            grads[f"proj.{i}"] = proj.weight.grad
        grads["out_weight"], grads["out_bias"] = model.out.weight.grad, model.out.bias.grad[None]
        out.append(grads)
    return out


@needs_cpu_kernels
@pytest.mark.parametrize("case", range(4))
def test_fused_training_forward_and_backward_equal_each_member(case, monkeypatch):
    """The fused training kernels against each member's own TimeMLP and against the batched matmuls' graph, for
    random shapes; at the paper's shape (batch 64, width 128) bit for bit, as their sums are in the same order."""
    gen = torch.Generator().manual_seed(10 + case)
    members, batch = int(torch.randint(1, 5, (1,), generator=gen)), [64, 64, 1, 37][case]
    hidden, layers = [(128, 3), (128, 3), (16, 1), (40, 2)][case]
    torch.manual_seed(case)
    models = [TimeMLP(hidden=hidden, n_layers=layers) for _ in range(members)]
    ens = stack_members(models)
    x, t = torch.randn(members, batch, 2, generator=gen), torch.randint(0, 1000, (members, batch), generator=gen)
    out = ens(x, t)
    g = torch.randn(out.shape, generator=gen)
    out.backward(g)
    fused = {name: p.grad.clone() for name, p in ens.named_parameters()}
    exact = batch == 64 and hidden == 128
    for m, (model, want) in enumerate(zip(models, _grads_of_each_member(models, x, t, g), strict=True)):
        own = model(x[m], t[m])
        assert torch.equal(out[m], own) if exact else torch.allclose(out[m], own, rtol=1e-5, atol=1e-6)
        for name, grad in want.items():
            if exact:
                assert torch.equal(fused[name][m], grad), (m, name)
            else:
                torch.testing.assert_close(fused[name][m], grad, rtol=1e-5, atol=1e-6)
    # the batched matmuls' graph (the path without the kernels) computes the same, to rounding
    ens.zero_grad()
    monkeypatch.setattr(extension, "available", lambda name: (False, "disabled for the test"))
    unfused = ens(x, t)
    unfused.backward(g)
    torch.testing.assert_close(out, unfused, rtol=1e-5, atol=1e-6)
    for name, p in ens.named_parameters():
        torch.testing.assert_close(fused[name], p.grad, rtol=1e-5, atol=1e-6)


@needs_cpu_kernels
def test_fused_training_kernels_refuse_bad_input():
    fwd, bwd = torch.ops.isofast_C.ensemble_mlp_train_forward, torch.ops.isofast_C.ensemble_mlp_train_backward
    M, B, E, H = 2, 5, 6, 8
    x, emb = torch.randn(M, B, 2), torch.randn(M, B, E)
    w, p, b = [torch.randn(M, H, 2)], [torch.randn(M, H, E)], [torch.randn(M, 1, H)]
    ow, ob = torch.randn(M, 2, H), torch.randn(M, 1, 2)
    out, hidden = fwd(x, emb, w, p, b, ow, ob)
    assert out.shape == (M, B, 2) and [h.shape for h in hidden] == [(M, B, H)]
    grads = bwd(torch.ones_like(out), x, emb, hidden, w, p, b, ow)
    assert [g.shape for g in grads[0] + grads[1] + grads[2]] == [(M, H, 2), (M, H, E), (M, 1, H)]
    with pytest.raises(RuntimeError, match=r"emb must be a float32 CPU tensor \(2, 5, width\)"):
        fwd(x, emb[:, :4], w, p, b, ow, ob)  # another batch
    with pytest.raises(RuntimeError, match=r"projs\[0\] must be a float32 CPU tensor \(2, 8, 6\)"):
        fwd(x, emb, w, [torch.randn(M, H, E + 1)], b, ow, ob)
    with pytest.raises(RuntimeError, match=r"out_weight must be a float32 CPU tensor \(2, 2, 8\)"):
        fwd(x, emb, w, p, b, torch.randn(M, 3, H), ob)
    with pytest.raises(RuntimeError, match="one tensor per hidden layer"):
        fwd(x, emb, w, p, [], ow, ob)
    with pytest.raises(RuntimeError, match=r"grad must be a float32 CPU tensor \(2, 5, 2\)"):
        bwd(torch.ones(M, B, 3), x, emb, hidden, w, p, b, ow)
    with pytest.raises(RuntimeError, match=r"hidden must be a float32 CPU tensor \(2, 5, 8\)"):
        bwd(torch.ones_like(out), x, emb, [torch.randn(M, B, H + 1)], w, p, b, ow)


def test_embedding_table_is_the_direct_embedding():
    """EnsembleMLP gathers integer timesteps' embeddings from a cached table: the same numbers, bit for bit."""
    from isofast.models.embedding import timestep_embedding

    ens = stack_members([TimeMLP() for _ in range(2)])
    gen = torch.Generator().manual_seed(0)
    for n in (1, 7, 64, 1000):
        t = torch.randint(0, 1000, (n,), generator=gen)
        assert torch.equal(ens._embedding(t), timestep_embedding(t, ens.emb_dim, ens.max_period))
    big = torch.tensor([5, 3000])  # beyond the table: it grows
    assert torch.equal(ens._embedding(big), timestep_embedding(big, ens.emb_dim, ens.max_period))
    frac = torch.tensor([0.5, 2.25])  # fractional timesteps are computed directly
    assert torch.equal(ens._embedding(frac), timestep_embedding(frac, ens.emb_dim, ens.max_period))



def _step_operands(members, batch, data_dim, T, gen):
    x0, eps = torch.randn(members, batch, data_dim, generator=gen), torch.randn(members, batch, data_dim, generator=gen)
    t = torch.randint(0, T, (members, batch), generator=gen)
    lambdas = torch.rand(members, generator=gen, dtype=torch.float64)
    return x0, eps, t, lambdas


@needs_cpu_kernels
@pytest.mark.parametrize("case", range(4))
def test_fused_train_step_equals_the_separate_ops(case):
    """ensemble_mlp_train_step (q_sample, the network, the loss and every gradient in one call) against the ops it
    fuses: q_sample, the training forward and backward through autograd and iso_ddpm_loss with groups, bit for bit
    (the same arithmetic in the same order), for random shapes; and the gradient norms it takes on the way against
    torch.linalg.vector_norm of each member's gradient, bit for bit (0 where the length is not a lane multiple)."""
    from isofast.ensemble import _verified_norm_lanes
    from isofast.ops import iso_ddpm_loss, operands, q_sample
    from isofast.schedule import NoiseSchedule

    gen = torch.Generator().manual_seed(20 + case)
    members, batch, data_dim = [(3, 64, 2), (1, 64, 2), (2, 37, 3), (4, 1, 2)][case]
    hidden, layers = [(128, 3), (128, 3), (40, 2), (16, 1)][case]
    torch.manual_seed(case)
    ens = stack_members([TimeMLP(data_dim=data_dim, hidden=hidden, n_layers=layers) for _ in range(members)])
    sched = NoiseSchedule.linear(T=100)
    x0, eps, t, lambdas = _step_operands(members, batch, data_dim, 100, gen)
    sa, sb = operands.table(sched, "q_sample", x0)
    lanes = _verified_norm_lanes()
    assert lanes in (8, 16)  # on the machines CI runs on; elsewhere torch's own norms are used
    loss, gw, gp, gb, g_out_w, g_out_b, norms = torch.ops.isofast_C.ensemble_mlp_train_step(
        x0, eps, t, sa, sb, ens.embedding_table(100, x0.device), lambdas, list(ens.weight), list(ens.proj),
        list(ens.bias), ens.out_weight, ens.out_bias, lanes)

    rows = members * batch
    x_t, _ = q_sample(x0.reshape(rows, -1), t.reshape(-1), sched, eps.reshape(rows, -1), backend="cpu")
    pred = ens(x_t.view_as(x0), t)
    lam = lambdas if members > 1 else float(lambdas[0])
    want = iso_ddpm_loss(pred.reshape(rows, -1), eps.reshape(rows, -1), lam, "batch", backend="cpu",
                         groups=members).reshape(members)
    want.sum().backward()
    assert torch.equal(loss, want.detach())
    grads = [*gw, *gp, *gb, g_out_w, g_out_b]
    for got, p in zip(grads, [*ens.weight, *ens.proj, *ens.bias, ens.out_weight, ens.out_bias], strict=True):
        assert got.shape == p.shape and torch.equal(got, p.grad)
    assert norms.shape == (members, len(grads))
    for i, g in enumerate(grads):
        whole = g[0].numel() % lanes == 0
        want_norms = torch.stack([torch.linalg.vector_norm(g[m]) for m in range(members)])
        assert torch.equal(norms[:, i], want_norms if whole else torch.zeros(members)), i


@needs_cpu_kernels
def test_fused_train_step_refuses_bad_input():
    from isofast.ops import operands
    from isofast.schedule import NoiseSchedule

    step = torch.ops.isofast_C.ensemble_mlp_train_step
    ens = stack_members([TimeMLP(hidden=8, n_layers=1, emb_dim=4) for _ in range(2)])
    x0, eps, t, lambdas = _step_operands(2, 5, 2, 10, torch.Generator().manual_seed(0))
    sa, sb = operands.table(NoiseSchedule.linear(T=10), "q_sample", x0)
    table = ens.embedding_table(10, x0.device)
    params = (list(ens.weight), list(ens.proj), list(ens.bias), ens.out_weight, ens.out_bias)
    assert step(x0, eps, t, sa, sb, table, lambdas, *params)[0].shape == (2,)
    with pytest.raises(RuntimeError, match="norm_lanes must be 0, 8 or 16"):
        step(x0, eps, t, sa, sb, table, lambdas, *params, 4)
    with pytest.raises(RuntimeError, match=r"eps must be a float32 CPU tensor \(2, 5, 2\)"):
        step(x0, eps[:, :4], t, sa, sb, table, lambdas, *params)
    with pytest.raises(RuntimeError, match=r"t must be an int64 CPU tensor \(2, 5\)"):
        step(x0, eps, t.int(), sa, sb, table, lambdas, *params)
    with pytest.raises(RuntimeError, match=r"t\[3\] = 10 is outside \[0, 10\)"):
        step(x0, eps, t.index_put((torch.tensor(0), torch.tensor(3)), torch.tensor(10)), sa, sb, table, lambdas,
             *params)
    with pytest.raises(RuntimeError, match=r"lambdas must be a float64 CPU vector \(2,\), one per member"):
        step(x0, eps, t, sa, sb, table, lambdas.float(), *params)
    with pytest.raises(RuntimeError, match=r"lambdas must be a float64 CPU vector \(2,\)"):
        step(x0, eps, t, sa, sb, table, lambdas[:1], *params)
    with pytest.raises(RuntimeError, match="sqrt_1mab must be a float32 CPU vector"):
        step(x0, eps, t, sa, sb[:5], table, lambdas, *params)
    with pytest.raises(RuntimeError, match=r"projs\[0\] must be a float32 CPU tensor \(2, 8, 5\)"):
        step(x0, eps, t, sa, sb, torch.randn(10, 5), lambdas, *params)  # the table's width is not the model's


@needs_cpu_kernels
def test_member_grad_norms_refuses_bad_input():
    op = torch.ops.isofast_C.member_grad_norms
    assert op([torch.ones(3, 16)], 8).shape == (3, 1)
    with pytest.raises(RuntimeError, match="a per-member length that is a multiple of 16"):
        op([torch.ones(3, 8)], 16)
    with pytest.raises(RuntimeError, match=r"grads\[1\] must be a float32 CPU tensor \(M, ...\) with the M = 3"):
        op([torch.ones(3, 8), torch.ones(2, 8)], 8)
    with pytest.raises(RuntimeError, match="lanes must be 8 or 16"):
        op([torch.ones(3, 8)], 4)
