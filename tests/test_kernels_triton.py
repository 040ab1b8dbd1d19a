"""The Triton kernel primitives against plain-torch expressions of their contract formulas.

On a machine without a GPU the kernels run under TRITON_INTERPRET=1 (set by conftest.py) on
CPU tensors, so shapes stay small. fp16/bf16 inputs are compared against the formula evaluated
in float32 on the same rounded inputs, with a tolerance of about one ulp of the output dtype.
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import isofast
from isofast import NoiseKey, NoiseSchedule
from isofast.noise import randint_contract, randn_contract, to_signed
from isofast.ops import backends

pytestmark = pytest.mark.skipif(
    not backends.status("triton")[0], reason=f"triton backend unavailable: {backends.status('triton')[1]}"
)

K = backends.kernels("triton") if backends.status("triton")[0] else None
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (rtol, atol) per output dtype: fp32 to 1e-5 relative; half types to about one ulp (the kernel
# and the expression both compute in fp32, then round once; results may straddle a rounding edge).
TOL = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (8e-3, 1e-5), torch.float16: (1e-3, 1e-5)}
FEW = settings(max_examples=4, deadline=None)  # per parametrised case

batches = st.integers(1, 4)
lengths = st.sampled_from([1, 2, 3, 5, 7, 31, 33, 64, 70]) | st.integers(1, 70)
keys64 = st.integers(0, 2**64 - 1) | st.sampled_from([0, 2**32 - 1, 2**32 + 7, 2**63, 2**64 - 1])


def _eps(seed: int, offset: int, batch: int, n: int) -> torch.Tensor:
    """The contract's noise for a (batch, n) draw, by the reference implementation."""
    return randn_contract(seed, offset, batch * n, DEVICE).reshape(batch, n)


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol)


def _data(batch: int, n: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    return (scale * torch.randn(batch, n, device=DEVICE)).to(dtype)


# -- the noise contract -------------------------------------------------------------------

@pytest.mark.parametrize(
    "seed, offset, numel",
    [(0, 0, 1), (1, 1, 6), (12345, 2**32 + 3, 37), (2**63 + 11, 2**40 - 1, 18), (2**64 - 1, 2**64 - 2, 21)],
)
def test_contract_draw_equals_reference_noise(seed, offset, numel):
    from isofast.kernels.philox import contract_draw

    normals, words = contract_draw(to_signed(seed), to_signed(offset), numel, DEVICE)
    assert torch.equal(words.to(torch.int64) & 0xFFFFFFFF, randint_contract(seed, offset, numel, DEVICE))
    torch.testing.assert_close(normals, randn_contract(seed, offset, numel, DEVICE), rtol=0, atol=4e-6)


def test_contract_draw_accepts_unsigned_and_signed_keys_alike():
    from isofast.kernels.philox import contract_draw

    unsigned = contract_draw(2**64 - 5, 2**63 + 1, 9, DEVICE)[1]
    signed = contract_draw(to_signed(2**64 - 5), to_signed(2**63 + 1), 9, DEVICE)[1]
    assert torch.equal(unsigned, signed)


# -- q_sample -------------------------------------------------------------------------------

@FEW
@given(data_seed=st.integers(0, 2**16), batch=batches, n=lengths, dtype=st.sampled_from(DTYPES), seed=keys64, offset=keys64)
@example(data_seed=0, batch=1, n=1, dtype=torch.float32, seed=2**64 - 1, offset=2**32 + 7)
@example(data_seed=1, batch=3, n=2, dtype=torch.bfloat16, seed=5, offset=2**64 - 1)  # rows straddle counters
@pytest.mark.parametrize("explicit", [False, True], ids=["keyed", "explicit"])
def test_q_sample_equals_formula(data_seed, batch, n, dtype, seed, offset, explicit):
    torch.manual_seed(data_seed)  # examples must replay identically (hypothesis shrinking)
    T = 17
    alphas_cumprod = torch.linspace(0.999, 0.01, T, device=DEVICE)
    sqrt_ab, sqrt_1mab = alphas_cumprod.sqrt(), (1 - alphas_cumprod).sqrt()
    x0 = _data(batch, n, dtype)
    t = torch.randint(0, T, (batch,), device=DEVICE)
    eps = _data(batch, n, dtype) if explicit else _eps(seed, offset, batch, n)
    out = K.q_sample(x0, t, sqrt_ab, sqrt_1mab, eps if explicit else None, to_signed(seed), to_signed(offset))
    expected = sqrt_ab[t, None] * x0.float() + sqrt_1mab[t, None] * eps.float()
    assert out.dtype == dtype and out.shape == (batch, n)
    _close(out, expected.to(dtype), dtype)


# -- the loss primitives ----------------------------------------------------------------------

@FEW
@given(data_seed=st.integers(0, 2**16), batch=batches, n=lengths, dtype=st.sampled_from(DTYPES), seed=keys64, offset=keys64)
@example(data_seed=0, batch=1, n=1, dtype=torch.float32, seed=2**64 - 1, offset=2**32 + 7)
@example(data_seed=1, batch=3, n=2, dtype=torch.bfloat16, seed=5, offset=2**64 - 1)  # rows straddle counters
@pytest.mark.parametrize("explicit", [False, True], ids=["keyed", "explicit"])
def test_iso_sums_equal_row_sums(data_seed, batch, n, dtype, seed, offset, explicit):
    torch.manual_seed(data_seed)  # examples must replay identically (hypothesis shrinking)
    p = _data(batch, n, dtype, scale=1.5)
    eps = _data(batch, n, dtype) if explicit else _eps(seed, offset, batch, n)
    sse, ssq = K.iso_sums(p, eps if explicit else None, to_signed(seed), to_signed(offset))
    assert sse.dtype == ssq.dtype == torch.float32 and sse.shape == ssq.shape == (batch,)
    # fp32 accumulation of n terms: compare to the float64 sums of the same rounded inputs
    p64, e64 = p.double(), eps.double()
    torch.testing.assert_close(sse.double(), ((p64 - e64) ** 2).sum(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ssq.double(), (p64**2).sum(1), rtol=1e-5, atol=1e-6)


@FEW
@given(data_seed=st.integers(0, 2**16), batch=batches, n=lengths, dtype=st.sampled_from(DTYPES), seed=keys64, offset=keys64)
@example(data_seed=0, batch=1, n=1, dtype=torch.float32, seed=2**64 - 1, offset=2**32 + 7)
@example(data_seed=1, batch=3, n=2, dtype=torch.bfloat16, seed=5, offset=2**64 - 1)  # rows straddle counters
@pytest.mark.parametrize("explicit", [False, True], ids=["keyed", "explicit"])
def test_iso_grad_equals_formula(data_seed, batch, n, dtype, seed, offset, explicit):
    torch.manual_seed(data_seed)  # examples must replay identically (hypothesis shrinking)
    p = _data(batch, n, dtype)
    eps = _data(batch, n, dtype) if explicit else _eps(seed, offset, batch, n)
    c1 = torch.randn(batch, device=DEVICE)
    c2 = torch.randn(1, device=DEVICE).expand(batch)  # autograd may hand in expanded gradients
    g = K.iso_grad(p, eps if explicit else None, to_signed(seed), to_signed(offset), c1, c2)
    expected = c1[:, None] * (p.float() - eps.float()) + c2[:, None] * p.float()
    assert g.dtype == dtype and g.shape == (batch, n)
    _close(g, expected.to(dtype), dtype)


def test_primitives_refuse_float64_and_non_row_layouts():
    p = torch.randn(2, 5, dtype=torch.float64, device=DEVICE)
    ones = torch.ones(2, device=DEVICE)
    with pytest.raises(TypeError, match="eps_pred"):
        K.iso_sums(p, None, 0, 0)
    with pytest.raises(TypeError, match="eps_pred"):
        K.iso_grad(p, None, 0, 0, ones, ones)
    with pytest.raises(TypeError, match="x0"):
        K.q_sample(p, torch.zeros(2, dtype=torch.int64, device=DEVICE), ones, ones, None, 0, 0)
    with pytest.raises(ValueError, match="eps_pred"):
        K.iso_sums(torch.randn(5, 2, device=DEVICE).t(), None, 0, 0)
    with pytest.raises(ValueError, match="noise"):
        K.iso_sums(torch.randn(2, 5, device=DEVICE), torch.randn(2, 4, device=DEVICE), 0, 0)


# -- sampler steps ----------------------------------------------------------------------------

def _sched(T: int = 23) -> NoiseSchedule:
    return NoiseSchedule.linear(T=T, beta_start=1e-3, beta_end=0.2).to(device=DEVICE, dtype=torch.float32)


@FEW
@given(data_seed=st.integers(0, 2**16), batch=batches, n=lengths, dtype=st.sampled_from(DTYPES), seed=keys64, offset=keys64,
       clip_x0=st.booleans(), variance=st.sampled_from(["fixed_small", "fixed_large"]))
@example(data_seed=0, batch=1, n=1, dtype=torch.float32, seed=2**64 - 1, offset=2**32 + 7, clip_x0=True,
         variance="fixed_large")
@example(data_seed=1, batch=3, n=2, dtype=torch.float16, seed=5, offset=2**64 - 1, clip_x0=False, variance="fixed_small")
@pytest.mark.parametrize("explicit", [False, True], ids=["keyed", "explicit"])
def test_ddpm_step_equals_formula(data_seed, batch, n, dtype, seed, offset, explicit, clip_x0, variance):
    torch.manual_seed(data_seed)  # examples must replay identically (hypothesis shrinking)
    sched = _sched()
    table = torch.stack([sched.sqrt_recip_alphas_cumprod, sched.sqrt_recipm1_alphas_cumprod,
                         sched.posterior_mean_coef1, sched.posterior_mean_coef2,
                         sched.posterior_std(variance)]).contiguous()
    x, p = _data(batch, n, dtype), _data(batch, n, dtype)
    t = torch.randint(0, sched.T, (batch,), device=DEVICE)
    t[0] = 0  # the last step adds no noise
    key = torch.tensor([to_signed(seed), to_signed(offset)], dtype=torch.int64, device=DEVICE)
    z = _data(batch, n, dtype) if explicit else _eps(seed, offset, batch, n)
    out = K.ddpm_step(x, p, t, table, z if explicit else None, None if explicit else key, clip_x0)
    c = table[:, t].unsqueeze(-1)
    x0 = c[0] * x.float() - c[1] * p.float()
    if clip_x0:
        x0 = x0.clamp(-1, 1)
    expected = c[2] * x0 + c[3] * x.float() + (t[:, None] > 0) * c[4] * z.float()
    assert out.dtype == dtype
    _close(out, expected.to(dtype), dtype)


@FEW
@given(data_seed=st.integers(0, 2**16), batch=batches, n=lengths, dtype=st.sampled_from(DTYPES), seed=keys64, offset=keys64,
       clip_x0=st.booleans())
@example(data_seed=0, batch=1, n=1, dtype=torch.float32, seed=2**64 - 1, offset=2**32 + 7, clip_x0=True)
@example(data_seed=1, batch=3, n=2, dtype=torch.float16, seed=5, offset=2**64 - 1, clip_x0=False)
@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("explicit", [False, True], ids=["keyed", "explicit"])
def test_ddim_step_equals_formula(data_seed, batch, n, dtype, seed, offset, explicit, clip_x0, eta):
    torch.manual_seed(data_seed)  # examples must replay identically (hypothesis shrinking)
    sched = _sched()
    ac = sched.alphas_cumprod.contiguous()
    x, p = _data(batch, n, dtype), _data(batch, n, dtype)
    t = torch.randint(1, sched.T, (batch,), device=DEVICE)
    t_prev = torch.clamp(t - torch.randint(1, 5, (batch,), device=DEVICE), min=-1)
    t_prev[-1] = -1  # jump straight to x0
    key = torch.tensor([to_signed(seed), to_signed(offset)], dtype=torch.int64, device=DEVICE)
    z = _data(batch, n, dtype) if explicit else _eps(seed, offset, batch, n)
    out = K.ddim_step(x, p, t, t_prev, ac, eta, z if explicit else None, None if explicit else key, clip_x0)
    ab = ac[t][:, None]
    ab_prev = torch.where(t_prev >= 0, ac[t_prev.clamp_min(0)], torch.ones_like(ac[t]))[:, None]
    x0 = (x.float() - (1 - ab).sqrt() * p.float()) / ab.sqrt()
    if clip_x0:
        x0 = x0.clamp(-1, 1)
    sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()
    expected = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma**2).clamp_min(0).sqrt() * p.float() + sigma * z.float()
    assert out.dtype == dtype
    _close(out, expected.to(dtype), dtype)


def test_steps_without_key_or_noise_are_refused():
    sched = _sched()
    table = torch.zeros(5, sched.T, device=DEVICE)
    x = torch.zeros(1, 3, device=DEVICE)
    t = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="noise"):
        K.ddpm_step(x, x, t, table, None, None, False)


# -- the public API on the triton backend ----------------------------------------------------

@settings(max_examples=8, deadline=None)
@given(data_seed=st.integers(0, 2**16), batch=batches, n=lengths, mode=st.sampled_from(["batch", "sample"]),
       reduction=st.sampled_from(["mean", "sum", "none"]), weighted=st.booleans(),
       iso_lambda=st.sampled_from([0.0, 0.3, 2.0]))
@pytest.mark.parametrize("keyed", [True, False], ids=["keyed", "explicit"])
def test_loss_and_gradient_equal_reference(data_seed, batch, n, mode, reduction, weighted, keyed, iso_lambda):
    torch.manual_seed(data_seed)  # examples must replay identically (hypothesis shrinking)
    if mode == "batch" and reduction == "none":
        reduction = "mean"
    shape = (batch, n) if n % 2 else (batch, 2, n // 2)  # the API flattens per sample
    key = NoiseKey.draw(shape, device=DEVICE)
    noise = key if keyed else torch.randn(shape, device=DEVICE)
    weights = torch.rand(batch, device=DEVICE) + 0.5 if weighted else None
    results = {}
    for backend in ("triton", "reference"):
        p = (1.3 * torch.randn(shape, generator=torch.Generator().manual_seed(data_seed), device="cpu")).to(DEVICE)
        p.requires_grad_(True)
        loss, parts = isofast.iso_ddpm_loss(p, noise, iso_lambda, mode, weights, reduction,
                                            return_parts=True, backend=backend)
        upstream = torch.linspace(0.5, 1.5, loss.numel(), device=DEVICE).reshape(loss.shape)
        (loss * upstream).sum().backward()
        results[backend] = (loss.detach(), parts, p.grad)
    (loss_t, parts_t, grad_t), (loss_r, parts_r, grad_r) = results["triton"], results["reference"]
    torch.testing.assert_close(loss_t, loss_r, rtol=1e-5, atol=1e-6)
    for got, want in zip(parts_t, parts_r, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_t, grad_r, rtol=1e-5, atol=1e-7)


@FEW
@given(data_seed=st.integers(0, 2**16), batch=batches, n=lengths, dtype=st.sampled_from(DTYPES))
def test_q_sample_noise_is_the_key_the_loss_regenerates(data_seed, batch, n, dtype):
    torch.manual_seed(data_seed)  # examples must replay identically (hypothesis shrinking)
    sched = NoiseSchedule.linear(T=40).to(device=DEVICE)
    x0 = torch.randn(batch, n, device=DEVICE).to(dtype)
    t = torch.randint(0, sched.T, (batch,), device=DEVICE)
    x_t, key = isofast.q_sample(x0, t, sched, backend="triton")
    assert isinstance(key, NoiseKey)
    sqrt_ab = sched.sqrt_alphas_cumprod.float()[t, None]
    sqrt_1mab = sched.sqrt_one_minus_alphas_cumprod.float()[t, None]
    recovered = (x_t.float() - sqrt_ab * x0.float()) / sqrt_1mab
    # x_t is rounded to its dtype once: the recovered noise carries that rounding, scaled up by 1/sqrt(1-ab)
    ulp = {torch.float32: 2e-7, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    bound = ulp * (x_t.float().abs() + 1e-30) / sqrt_1mab + 4e-6
    # kernels use the float32 draw for every data dtype (materialize() rounds it to the key's dtype)
    assert torch.equal(key.materialize(), _eps(key.seed, key.offset, batch, n).to(dtype))
    assert ((recovered - _eps(key.seed, key.offset, batch, n)).abs() <= 2 * bound).all()
    # and the loss, given only the key, regenerates that noise: its MSE against the materialised
    # tensor is at the level of the few-ulp log/sin/cos differences the contract allows (a wrong
    # draw would give about 2)
    if dtype == torch.float32:
        _, parts = isofast.iso_ddpm_loss(key.materialize(), key, 0.0, "sample", return_parts=True, backend="triton")
        assert parts.mse.item() < (4e-6) ** 2


@pytest.mark.parametrize("keyed", [True, False])
@pytest.mark.parametrize("mode", ["batch", "sample"])
def test_loss_saves_nothing_beyond_eps_pred(keyed, mode):
    batch, shape = 3, (3, 2, 5, 7)
    p = torch.randn(shape, device=DEVICE, requires_grad=True)
    noise = NoiseKey.draw(shape, device=DEVICE) if keyed else torch.randn(shape, device=DEVICE)
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = isofast.iso_ddpm_loss(p, noise, 0.3, mode, torch.rand(batch, device=DEVICE), backend="triton")
    row_bytes = p.numel() * p.element_size()
    allowed = row_bytes * (1 if keyed else 2) + 64 * batch * 8  # eps_pred (+ eps) + O(B) scalars
    assert sum(saved) <= allowed, saved
    assert max(saved) <= row_bytes
    loss.backward()
    assert p.grad is not None and p.grad.shape == p.shape


@FEW
@given(data_seed=st.integers(0, 2**16), batch=batches, n=lengths, dtype=st.sampled_from(DTYPES), eta=st.sampled_from([0.0, 1.0]),
       clip_x0=st.booleans())
def test_steps_equal_reference_given_key_and_t(data_seed, batch, n, dtype, eta, clip_x0):
    torch.manual_seed(data_seed)  # examples must replay identically (hypothesis shrinking)
    sched = NoiseSchedule.cosine(T=30).to(device=DEVICE)
    x = torch.randn(batch, n, device=DEVICE).to(dtype)
    p = torch.randn(batch, n, device=DEVICE).to(dtype)
    t = torch.randint(0, sched.T, (batch,), device=DEVICE)
    t_prev = t - 1
    key = NoiseKey.draw((batch, n), dtype, DEVICE)
    steps = {
        "ddpm": lambda backend: isofast.ddpm_step(x, p, t, sched, key, clip_x0=clip_x0, backend=backend),
        "ddim": lambda backend: isofast.ddim_step(x, p, t, t_prev, sched, eta, key, clip_x0=clip_x0, backend=backend),
    }
    for name, step in steps.items():
        got, want = step("triton"), step("reference")
        assert got.dtype == want.dtype == dtype, name
        # the reference multiplies by float64-derived tables and, for half dtypes, uses the noise
        # rounded to the data dtype (NoiseKey.materialize) where the kernel keeps it in fp32: about
        # one ulp of the output at the scale of its terms (a wrong draw is off by ~sigma)
        rtol, atol = {torch.float32: (1e-5, 2e-5), torch.bfloat16: (1.6e-2, 1.6e-2),
                      torch.float16: (2e-3, 2e-3)}[dtype]
        torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol, msg=name)


# -- launch settings ---------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 13, 16, 64, 70, 301, 2048, 4100, 12288, 196608, 196609])
def test_gpu_settings_windows_cover_every_row_exactly(n, monkeypatch):
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
def test_kernels_with_gpu_block_sizes(n, monkeypatch):
    """The GPU launch configurations (bigger blocks, one window or several) in the interpreter."""
    from isofast.kernels import settings

    monkeypatch.setattr(settings, "interpreting", lambda: False)
    batch, seed, offset = 3, 2**64 - 9, 2**32 + 1
    p = torch.randn(batch, n, device=DEVICE)
    eps = _eps(seed, offset, batch, n)
    sse, ssq = K.iso_sums(p, None, to_signed(seed), to_signed(offset))
    torch.testing.assert_close(sse.double(), ((p.double() - eps.double()) ** 2).sum(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ssq.double(), (p.double() ** 2).sum(1), rtol=1e-5, atol=1e-6)
    c1, c2 = torch.randn(batch, device=DEVICE), torch.randn(batch, device=DEVICE)
    g = K.iso_grad(p, None, to_signed(seed), to_signed(offset), c1, c2)
    torch.testing.assert_close(g, c1[:, None] * (p - eps) + c2[:, None] * p, rtol=1e-5, atol=1e-6)


# -- selfcheck -----------------------------------------------------------------------------------

def test_selfcheck_passes_kernels_and_flags_a_wrong_one(monkeypatch):
    from isofast import selfcheck

    results = selfcheck.check_backend("triton", DEVICE, 2, (1, 3, 3), (torch.float32,))
    assert len(results) == len(selfcheck._cases()) and all(r.passed for r in results), results
    wrong = K.iso_grad
    monkeypatch.setattr(K, "iso_grad", lambda p, e, s, o, c1, c2: 1.001 * wrong(p, e, s, o, c1, c2))
    results = {r.op: r for r in selfcheck.check_backend("triton", DEVICE, 2, (1, 3, 3), (torch.float32,))}
    assert not results["loss batch (key) fwd+bwd"].passed and results["q_sample (key)"].passed


@pytest.mark.skipif(DEVICE == "cuda", reason="the GPU runs the kernels themselves")
def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter cannot see GPU lowering errors: compile every kernel to an sm_90 cubin."""
    import subprocess
    import sys

    code = ("from isofast.selfcheck import compile_check\n"
            "bad = [r for r in compile_check(90, ('fp32',)) if not r.passed]\n"
            "print(bad)\nraise SystemExit(1 if bad else 0)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_noising_and_loss_compile_without_graph_breaks():
    """fullgraph=True raises on any graph break: the custom ops must be traceable end to end."""
    sched = NoiseSchedule.linear(T=50).to(device=DEVICE)

    def train_step(x0, t, scale):
        x_t, key = isofast.q_sample(x0, t, sched, NoiseKey(seed=5, offset=2**40, shape=x0.shape, device=DEVICE),
                                    backend="triton")
        return isofast.iso_ddpm_loss(x_t * scale, key, 0.3, "batch", backend="triton")

    x0, t = torch.randn(3, 2, 5, device=DEVICE), torch.randint(0, 50, (3,), device=DEVICE)
    grads = []
    for fn in (torch.compile(train_step, backend="aot_eager", fullgraph=True), train_step):
        scale = torch.ones(1, device=DEVICE, requires_grad=True)
        loss = fn(x0, t, scale)
        loss.backward()
        grads.append((loss.detach(), scale.grad))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=0)
