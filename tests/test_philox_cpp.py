"""csrc/philox.h and the CPU noise generator against the Python reference of the noise contract.

Integers bit-exact; normals within 4e-6 (the contract allows a few ulp of log/sin/cos), for
seeds and offsets above 2**32 and near 2**64 (counter wrap-around), and for any element count.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from isofast import noise

compiled = pytest.importorskip("isofast.ops.compiled")
if compiled._C is None:
    pytest.skip(compiled._IMPORT_ERROR, allow_module_level=True)

ops = torch.ops.isofast_C
ROOT = Path(__file__).resolve().parents[1]
U64 = st.integers(0, 2**64 - 1)
NORMAL_ATOL = 4e-6


def _bits(seed: int, offset: int, numel: int) -> torch.Tensor:
    words = ops.philox_bits(torch.empty(numel), noise.to_signed(seed), noise.to_signed(offset))
    return (words.to(torch.int64) & noise.MASK32).reshape(-1)[:numel]


def _normals(seed: int, offset: int, numel: int, scalar: bool) -> torch.Tensor:
    return ops.philox_randn(torch.empty(numel), noise.to_signed(seed), noise.to_signed(offset), scalar)


@settings(max_examples=40, deadline=None)
@given(seed=U64, offset=U64, numel=st.integers(1, 300))
def test_philox_words_equal_reference(seed, offset, numel):
    assert torch.equal(_bits(seed, offset, numel), noise.randint_contract(seed, offset, numel))


@pytest.mark.parametrize("seed, offset", [(0, 0), (2**32 + 7, 2**33 + 1), (2**64 - 1, 2**64 - 5), (12345, 2**63)])
def test_philox_words_large_keys(seed, offset):
    numel = 1001  # odd: the last call is partly used; with offset near 2**64 the counter wraps
    assert torch.equal(_bits(seed, offset, numel), noise.randint_contract(seed, offset, numel))


def test_philox_known_answer():
    # Random123's published Philox4x32-10 answer for counter = key = 0 (kat_vectors).
    words = ops.philox_bits(torch.empty(4), 0, 0).to(torch.int64) & noise.MASK32
    assert words.reshape(-1).tolist() == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


@pytest.mark.parametrize("scalar", [False, True], ids=["vectorised", "libm"])
@settings(max_examples=25, deadline=None)
@given(seed=U64, offset=U64, numel=st.integers(1, 600))
def test_normals_match_reference(scalar, seed, offset, numel):
    got = _normals(seed, offset, numel, scalar)
    ref = noise.randn_contract(seed, offset, numel)
    assert got.dtype == torch.float32 and got.shape == (numel,)
    torch.testing.assert_close(got, ref, atol=NORMAL_ATOL, rtol=0)


@pytest.mark.parametrize("offset", [2**32 - 37, 2**64 - 37, 2**33 - 1])
def test_normals_across_the_low_counter_word(offset):
    # The vectorised generator splits the 64-bit counter into 32-bit lanes: a block that crosses
    # 2**32 (or wraps at 2**64) must carry into the high word exactly as the reference does.
    got = _normals(2**40 + 9, offset, 1001, False)
    torch.testing.assert_close(got, noise.randn_contract(2**40 + 9, offset, 1001), atol=NORMAL_ATOL, rtol=0)


def test_portable_generator_equals_the_default_one():
    # ISOFAST_NO_AVX512=1 takes the portable generator (what CPUs without AVX-512 run), read once
    # per process: compare it, in a subprocess, with the default one and the reference.
    code = (
        "import torch, isofast.ops.compiled as c; from isofast import noise;"
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


def test_normals_many_draws_cover_tails():
    # 2**18 normals reach |z| > 4.5 and u near the 1e-7 clamp; the vectorised log/sincos stay accurate there.
    seed, offset, numel = 2**40 + 3, 2**35, 1 << 18
    got = _normals(seed, offset, numel, False)
    ref = noise.randn_contract(seed, offset, numel)
    torch.testing.assert_close(got, ref, atol=NORMAL_ATOL, rtol=0)
    assert ref.abs().max() > 4.5


def test_uniform_clamp_gives_finite_normals():
    # Tiny uniforms are clamped to 1e-7 before the log: no inf/nan anywhere in a long draw.
    got = _normals(7, 0, 1 << 16, False)
    assert torch.isfinite(got).all()
