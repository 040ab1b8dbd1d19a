"""The noise contract's reference: Philox integers, normals, statistics, and NoiseKey."""
import math

import numpy as np
import pytest
import scipy.stats
import torch
import triton
import triton.language as tl

from isofast.noise import NoiseKey, philox4x32, randint_contract, randn_contract, to_signed, to_unsigned


def philox_scalar(seed: int, counter: int) -> list[int]:
    """Philox4x32-10 on Python ints: a second, loop-by-loop expression of the contract."""
    m = 0xFFFFFFFF
    c = [counter & m, (counter >> 32) & m, 0, 0]
    k = [seed & m, (seed >> 32) & m]
    for _ in range(10):
        pa, pb = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(pb >> 32) ^ c[1] ^ k[0], pb & m, (pa >> 32) ^ c[3] ^ k[1], pa & m]
        k = [(k[0] + 0x9E3779B9) & m, (k[1] + 0xBB67AE85) & m]
    return c


@pytest.mark.parametrize("seed", [0, 1, 2**32 + 5, 2**63 + 12345, 2**64 - 1])
@pytest.mark.parametrize("counter", [0, 7, 2**32 - 1, 2**32 + 3, 2**63 + 1, 2**64 - 1])
def test_philox_matches_scalar_python(seed, counter):
    words = philox4x32(seed, torch.tensor([to_signed(counter)], dtype=torch.int64))
    assert [int(w) for w in words] == philox_scalar(seed, counter)


def test_philox_known_answer():
    # Random123's published known-answer vector for philox4x32-10 with counter and key all zero:
    # ctr = (0,0,0,0), key = (0,0) -> 6627e8d5 e169c58d bc57ac4c 9b00dbd8.
    words = philox4x32(0, torch.zeros(1, dtype=torch.int64))
    assert [int(w) for w in words] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


@triton.jit
def _contract_kernel(ints_ptr, normals_ptr, seed, offset, CALLS: tl.constexpr):
    idx = tl.arange(0, CALLS)
    counter = idx.to(tl.int64) + offset
    r = tl.randint4x(seed, counter)
    n = tl.randn4x(seed, counter)
    for k in tl.static_range(4):
        tl.store(ints_ptr + idx * 4 + k, r[k].to(tl.int64) & 0xFFFFFFFF)
        tl.store(normals_ptr + idx * 4 + k, n[k])


@pytest.mark.parametrize(
    "seed,offset", [(0, 0), (12345, 3), (2**32 + 17, 2**32 + 9), (2**40 + 1, 2**36 + 5), (2**62 + 7, 2**61 - 3)]
)
def test_reference_equals_triton_randn4x(seed, offset):
    """Triton (interpreted on CPU, for real on a GPU) and the reference: integers bit for bit, normals to 4e-6."""
    calls = 64
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ints = torch.zeros(calls * 4, dtype=torch.int64, device=device)
    normals = torch.zeros(calls * 4, dtype=torch.float32, device=device)
    _contract_kernel[(1,)](ints, normals, seed, offset, CALLS=calls)
    assert torch.equal(ints.cpu(), randint_contract(seed, offset, calls * 4))
    torch.testing.assert_close(normals.cpu(), randn_contract(seed, offset, calls * 4), rtol=0, atol=4e-6)


def test_odd_length_is_prefix_of_longer_draw():
    assert torch.equal(randn_contract(9, 4, 7), randn_contract(9, 4, 12)[:7])


def test_offset_advances_by_quarter():
    """Element 4k of a draw at offset o is element 0 of the draw at offset o + k."""
    long = randn_contract(3, 10, 40)
    assert torch.equal(long[8:], randn_contract(3, 12, 32))


def test_normal_statistics():
    x = randn_contract(2**33 + 1, 2**34 + 3, 2**20).double().numpy()
    n = x.size
    assert abs(x.mean()) < 5 / math.sqrt(n)
    assert abs(x.std() - 1) < 5 * math.sqrt(0.5 / n)
    assert abs(scipy.stats.skew(x)) < 5 * math.sqrt(6 / n)
    assert abs(scipy.stats.kurtosis(x)) < 5 * math.sqrt(24 / n)
    assert scipy.stats.kstest(x, "norm").pvalue > 1e-3
    # neighbouring elements come from one Philox call: they must not be correlated
    assert abs(np.corrcoef(x[0::4], x[1::4])[0, 1]) < 5 / math.sqrt(n / 4)


def test_signed_roundtrip():
    for v in (0, 1, 2**63 - 1, 2**63, 2**64 - 1):
        assert to_unsigned(to_signed(v)) == v
        assert -(2**63) <= to_signed(v) < 2**63


class TestNoiseKey:
    def test_materialize_shape_dtype(self):
        key = NoiseKey(5, 7, (2, 3, 5), torch.float64)
        x = key.materialize()
        assert x.shape == (2, 3, 5) and x.dtype == torch.float64
        assert torch.equal(x.flatten(), randn_contract(5, 7, 30).double())

    def test_next_offset(self):
        assert NoiseKey(1, 10, (3, 3)).next_offset == 10 + 3  # ceil(9 / 4)
        assert NoiseKey(1, 2**64 - 1, (4,)).next_offset == 0  # wraps like uint64

    def test_draw_is_repeatable_with_manual_seed(self):
        torch.manual_seed(123)
        a = NoiseKey.draw((4, 2))
        torch.manual_seed(123)
        b = NoiseKey.draw((4, 2))
        assert a == b and torch.equal(a.materialize(), b.materialize())
        assert NoiseKey.draw((4, 2)).seed != a.seed

    def test_draw_uses_given_generator(self):
        g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
        assert NoiseKey.draw((3,), generator=g1) == NoiseKey.draw((3,), generator=g2)

    @pytest.mark.parametrize("seed,offset", [(-1, 0), (0, -1), (2**64, 0)])
    def test_out_of_range_key_is_refused(self, seed, offset):
        with pytest.raises(ValueError, match="seed|offset"):
            NoiseKey(seed, offset, (2,))

    def test_non_float_dtype_is_refused(self):
        with pytest.raises(TypeError, match="dtype"):
            NoiseKey(0, 0, (2,), torch.int32)

    @pytest.mark.parametrize("shape,error", [((2, -3), ValueError), ((2.5, 3), TypeError), ((2, True), TypeError),
                                             ("23", TypeError), (5, TypeError), ((2, None), TypeError)])
    def test_bad_shape_is_refused(self, shape, error):
        """Negative sizes were kept and non-integer ones truncated by int() (issue 14)."""
        with pytest.raises(error, match="NoiseKey shape"):
            NoiseKey(1, 0, shape)

    def test_numpy_integers_are_taken_as_ints(self):
        key = NoiseKey(np.uint64(2**64 - 1), np.int64(3), (np.int64(2), np.int32(3)))
        assert key == NoiseKey(2**64 - 1, 3, (2, 3))
        assert type(key.seed) is int and type(key.offset) is int and all(type(s) is int for s in key.shape)
        with pytest.raises(TypeError, match="seed must be an int"):
            NoiseKey(np.float64(1.0), 0, (2,))

    def test_bad_device_is_a_value_error(self):
        with pytest.raises(ValueError, match="NoiseKey device"):
            NoiseKey(0, 0, (2,), device="nowhere")

    def test_as_tensor_holds_bit_patterns(self):
        key = NoiseKey(2**64 - 1, 2**63, (2,))
        assert key.as_tensor().tolist() == [-1, -(2**63)]
