"""The noise contract on every backend: Philox words bit-exact, normals within a few ulp of the reference.

The compiled generator (``torch.ops.isofast_C.philox_bits``/``philox_randn``, csrc/philox.h and
csrc/cpu/noise.cpp; CUDA kernels on a GPU), Triton's (``isofast.kernels.philox.contract_draw``) and the
noise every fused primitive generates in-kernel, against ``isofast.noise`` (the contract in plain
PyTorch): seeds and offsets above 2**32 and near 2**64 (counter wrap-around), any element count.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import NOISE_ATOL, U64, on
from hypothesis import given, settings
from hypothesis import strategies as st

from isofast import noise

ROOT = Path(__file__).resolve().parents[2]
NORMAL_ATOL = NOISE_ATOL
KEYS = [(0, 0), (12345, 3), (2**40 + 9, 2**32 - 37), (2**64 - 1, 2**64 - 37), (2**63 + 5, 2**63)]

ops = torch.ops.isofast_C


def _bits(seed: int, offset: int, numel: int, device="cpu") -> torch.Tensor:
    words = ops.philox_bits(torch.empty(numel, device=device), noise.to_signed(seed), noise.to_signed(offset))
    return (words.cpu().to(torch.int64) & noise.MASK32).reshape(-1)[:numel]


def _normals(seed: int, offset: int, numel: int, scalar: bool, device="cpu") -> torch.Tensor:
    like = torch.empty(numel, device=device)
    return ops.philox_randn(like, noise.to_signed(seed), noise.to_signed(offset), scalar).cpu()


# ---------------------------------------------------------------- the compiled generator
@on("cpu", "cuda")
def test_philox_words_equal_reference(backend):
    @settings(max_examples=40, deadline=None)
    @given(seed=U64, offset=U64, numel=st.integers(1, 300))
    def body(seed, offset, numel):
        assert torch.equal(_bits(seed, offset, numel, backend.device), noise.randint_contract(seed, offset, numel))

    body()


@on("cpu", "cuda")
@pytest.mark.parametrize("seed, offset", [(0, 0), (2**32 + 7, 2**33 + 1), (2**64 - 1, 2**64 - 5), (12345, 2**63)])
def test_philox_words_large_keys(backend, seed, offset):
    numel = 1001  # odd: the last call is partly used; with offset near 2**64 the counter wraps
    assert torch.equal(_bits(seed, offset, numel, backend.device), noise.randint_contract(seed, offset, numel))


@on("cpu", "cuda")
def test_philox_known_answer(backend):
    # Random123's published Philox4x32-10 answer for counter = key = 0 (kat_vectors).
    words = ops.philox_bits(torch.empty(4, device=backend.device), 0, 0).cpu().to(torch.int64) & noise.MASK32
    assert words.reshape(-1).tolist() == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


@on("cpu", "cuda")
@pytest.mark.parametrize("scalar", [False, True], ids=["vectorised", "libm"])
def test_normals_match_reference(backend, scalar):
    @settings(max_examples=25, deadline=None)
    @given(seed=U64, offset=U64, numel=st.integers(1, 600))
    def body(seed, offset, numel):
        got = _normals(seed, offset, numel, scalar, backend.device)
        ref = noise.randn_contract(seed, offset, numel)
        assert got.dtype == torch.float32 and got.shape == (numel,)
        torch.testing.assert_close(got, ref, atol=NORMAL_ATOL, rtol=0)

    body()


@on("cpu", "cuda")
@pytest.mark.parametrize("offset", [2**32 - 37, 2**64 - 37, 2**33 - 1])
def test_normals_across_the_low_counter_word(backend, offset):
    # The vectorised generator splits the 64-bit counter into 32-bit lanes: a block that crosses
    # 2**32 (or wraps at 2**64) must carry into the high word exactly as the reference does.
    got = _normals(2**40 + 9, offset, 1001, False, backend.device)
    torch.testing.assert_close(got, noise.randn_contract(2**40 + 9, offset, 1001), atol=NORMAL_ATOL, rtol=0)


@on("cpu")
def test_portable_generator_equals_the_default_one(backend):
    # ISOFAST_NO_AVX512=1 takes the portable generator (what CPUs without AVX-512 run), read once
    # per process: compare it, in a subprocess, with the default one and the reference.
    code = (
        "import torch, isofast.ops.extension as c; from isofast import noise;"
        "x = torch.ops.isofast_C.philox_randn(torch.empty(5003), noise.to_signed(2**63 + 5), noise.to_signed(2**32 - 70));"
        "torch.save({'x': x, 'isa': c._C.noise_isa()}, __import__('sys').argv[1])"
    )
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in (("default", {}), ("portable", {"ISOFAST_NO_AVX512": "1"})):
            path = os.path.join(tmp, f"{name}.pt")
            env = {**os.environ, **extra}
            subprocess.run([sys.executable, "-c", code, path], check=True, env=env, cwd=ROOT)
            out[name] = torch.load(path)
    assert out["portable"]["isa"] != "AVX-512"
    ref = noise.randn_contract(2**63 + 5, 2**32 - 70, 5003)
    torch.testing.assert_close(out["portable"]["x"], ref, atol=NORMAL_ATOL, rtol=0)
    torch.testing.assert_close(out["default"]["x"], ref, atol=NORMAL_ATOL, rtol=0)


@on("cpu", "cuda")
def test_normals_many_draws_cover_tails(backend):
    # 2**18 normals reach |z| > 4.5 and u near the 1e-7 clamp; the vectorised log/sincos stay accurate there.
    seed, offset, numel = 2**40 + 3, 2**35, 1 << 18
    got = _normals(seed, offset, numel, False, backend.device)
    ref = noise.randn_contract(seed, offset, numel)
    torch.testing.assert_close(got, ref, atol=NORMAL_ATOL, rtol=0)
    assert ref.abs().max() > 4.5


@on("cpu", "cuda")
def test_uniform_clamp_gives_finite_normals(backend):
    # Tiny uniforms are clamped to 1e-7 before the log: no inf/nan anywhere in a long draw.
    got = _normals(7, 0, 1 << 16, False, backend.device)
    assert torch.isfinite(got).all()


@on("cuda")
def test_cuda_philox_equals_cpu(backend):
    seed, offset = 2**41 + 5, 2**35 + 7
    s, o = noise.to_signed(seed), noise.to_signed(offset)
    for numel in (1 * 1 + 3, 2 * 3 + 3, 4 * 3072 + 3, 2 * 70001 + 3):
        like = torch.empty(numel)
        assert torch.equal(ops.philox_bits(like.to(backend.device), s, o).cpu(), ops.philox_bits(like, s, o))
        torch.testing.assert_close(ops.philox_randn(like.to(backend.device), s, o).cpu(),
                                   noise.randn_contract(seed, offset, like.numel()), rtol=0, atol=NOISE_ATOL)


# ---------------------------------------------------------------- Triton's generator
@on("triton")
@pytest.mark.parametrize(
    "seed, offset, numel",
    [(0, 0, 1), (1, 1, 6), (12345, 2**32 + 3, 37), (2**63 + 11, 2**40 - 1, 18), (2**64 - 1, 2**64 - 2, 21)],
)
def test_contract_draw_equals_reference_noise(backend, seed, offset, numel):
    from isofast.kernels.philox import contract_draw

    normals, words = contract_draw(noise.to_signed(seed), noise.to_signed(offset), numel, backend.device)
    assert torch.equal(words.to(torch.int64).cpu() & 0xFFFFFFFF, noise.randint_contract(seed, offset, numel))
    torch.testing.assert_close(normals.cpu(), noise.randn_contract(seed, offset, numel), rtol=0, atol=4e-6)


@on("triton")
def test_contract_draw_accepts_unsigned_and_signed_keys_alike(backend):
    from isofast.kernels.philox import contract_draw

    unsigned = contract_draw(2**64 - 5, 2**63 + 1, 9, backend.device)[1]
    signed = contract_draw(noise.to_signed(2**64 - 5), noise.to_signed(2**63 + 1), 9, backend.device)[1]
    assert torch.equal(unsigned, signed)


# ---------------------------------------------------------------- the noise of the fused primitives
@pytest.mark.parametrize("seed,offset", KEYS)
def test_same_eps_on_every_backend(backend, seed, offset):
    # The backend's generator gives the contract's integers exactly, and the eps its loss kernels
    # generate are the reference's normals within a few ulp (so any two backends within twice that).
    numel = 1001  # not a multiple of 4: the last Philox call is partly used
    s, o = noise.to_signed(seed), noise.to_signed(offset)
    ref_words = noise.randint_contract(seed, offset, numel)
    ref = noise.randn_contract(seed, offset, numel)
    generated = []
    if backend.name == "triton":
        from isofast.kernels.philox import contract_draw

        normals, words = contract_draw(seed, offset, numel, backend.device)
        generated.append(normals.cpu())
    else:
        words = ops.philox_bits(torch.empty(numel, device=backend.device), s, o).reshape(-1)[:numel]
        generated.append(ops.philox_randn(torch.empty(numel, device=backend.device), s, o).cpu())
    assert torch.equal(words.cpu().to(torch.int64) & noise.MASK32, ref_words)

    # The eps the loss kernels themselves generate: iso_grad with p = 0, c1 = -1, c2 = 0 writes eps.
    B, n = 7, 143
    assert B * n == numel
    dev = backend.device
    p = torch.zeros(B, n, device=dev)
    c1, c2 = -torch.ones(B, device=dev), torch.zeros(B, device=dev)
    generated.append(backend.ops.iso_grad(p, None, s, o, c1, c2).reshape(-1).cpu())
    for got in generated:
        torch.testing.assert_close(got, ref, rtol=0, atol=NORMAL_ATOL)


def test_same_eps_on_cpu_and_triton():
    """The two generators of a CPU machine side by side (the compiled kernels and Triton's interpreter)."""
    from isofast.ops import backends

    names = backends.fused("cpu")
    if not {"cpu", "triton"} <= set(names):
        pytest.skip(f"needs the compiled and the Triton backends on CPU tensors, have {names}")
    seed, offset, B, n = 2**40 + 9, 2**32 - 37, 7, 143
    s, o = noise.to_signed(seed), noise.to_signed(offset)
    drawn = {}
    for name in ("cpu", "triton"):
        lib = backends.library(name)
        drawn[name] = lib.iso_grad(torch.zeros(B, n), None, s, o, -torch.ones(B), torch.zeros(B)).reshape(-1)
    torch.testing.assert_close(drawn["cpu"], drawn["triton"], rtol=0, atol=2 * NORMAL_ATOL)


def test_noise_is_regenerated_identically(backend):
    # q_sample, iso_sums and iso_grad see bit-identical eps: with x0 = 0, sqrt_1mab = 1 the
    # q_sample output *is* eps, and iso_grad with c1 = -1, c2 = 1 returns eps too.
    B, n, seed, offset = 4, 333, 99, 2**40
    dev = backend.device
    t = torch.zeros(B, dtype=torch.int64, device=dev)
    zeros, one = torch.zeros(B, n, device=dev), torch.ones(1, device=dev)
    eps_q = backend.ops.q_sample(zeros, t, torch.zeros(1, device=dev), one, None, seed, offset)
    eps_g = backend.ops.iso_grad(zeros, None, seed, offset, -torch.ones(B, device=dev), torch.ones(B, device=dev))
    assert torch.equal(eps_q, eps_g)
    sse, _ = backend.ops.iso_sums(eps_q, None, seed, offset)
    assert torch.equal(sse.cpu(), torch.zeros(B))
