"""Shared pieces of the per-op tests (tests/ops): the backends under test, tolerances, data, noise.

Every op test takes the fixture ``backend`` (a `Backend`): one case per fused backend, "cpu" (the
compiled ``torch.ops.isofast_C`` ops on CPU tensors), "triton" (``torch.ops.isofast_triton``; under
TRITON_INTERPRET=1 on CPU tensors where there is no GPU, set by tests/conftest.py) and "cuda" (the
compiled ops on CUDA tensors), each skipped with its reason where it cannot run. `on(...)` narrows a
test to some of them. The reference (`isofast.reference`, plain PyTorch, or the formula in torch ops)
is the oracle beside each.

Hypothesis runs inside a test (`check`), so each backend family keeps its own example count, shapes
and tolerances: the compiled ops ("cpu", "cuda") those of the former tests/test_compiled.py, Triton
those of the former tests/test_kernels_triton.py (the interpreter runs programs one by one: small shapes).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from isofast import noise
from isofast.ops import backends

# Row lengths n drawn by the hypothesis tests: the edge cases (1, 2, 3, odd, around a power of two) and any n.
LENGTHS = st.sampled_from([1, 2, 3, 5, 7, 31, 33, 64, 70]) | st.integers(1, 70)

FUSED = ("cpu", "triton", "cuda")
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
NOISE_ATOL = 4e-6  # a generator's normals vs the reference's (ARCHITECTURE.md, noise contract step 3)
U64 = st.integers(0, 2**64 - 1)
# every u64, and the values where the 32-bit halves carry or the signed bit pattern turns negative
KEYS = U64 | st.sampled_from([0, 2**32 - 1, 2**32 + 7, 2**63, 2**64 - 1])

# (rtol, atol) of a primitive's output in the data dtype against its formula on the same rounded inputs
PRIMITIVE_TOL = {
    # float64 only sees the float32 noise's few ulp
    "compiled": {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-5), torch.bfloat16: (1.6e-2, 1e-2),
                 torch.float16: (2e-3, 2e-3)},
    # fp32 to 1e-5 relative; half types to about one ulp (kernel and formula both compute in fp32,
    # then round once; results may straddle a rounding edge)
    "triton": {torch.float32: (1e-5, 1e-6), torch.bfloat16: (8e-3, 1e-5), torch.float16: (1e-3, 1e-5)},
}
# (B, n) of the primitive tests: the compiled kernels see their vector widths and tiles, the
# interpreter rows of a few windows of 32
PRIMITIVE_SHAPES = {
    "compiled": st.tuples(st.integers(1, 5), st.sampled_from([1, 2, 3, 4, 5, 7, 8, 31, 64, 97, 300])),
    "triton": st.tuples(st.integers(1, 4), LENGTHS),
}
# keys whose counters carry (offset near 2**64) on the smallest rows, run by every primitive test
EDGE_EXAMPLES = (
    dict(shape=(1, 1), seed=2**64 - 1, offset=2**32 + 7, data_seed=0),
    dict(shape=(3, 2), seed=5, offset=2**64 - 1, data_seed=1),  # rows straddle counters
)


def _triton_device() -> str:
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


@dataclass(frozen=True)
class Backend:
    """One fused backend under test: its op namespace, the device of its tensors, the dtypes it takes."""

    name: str

    @property
    def family(self) -> str:
        """"compiled" (isofast_C on CPU or CUDA) or "triton": the key of the per-family tables."""
        return "triton" if self.name == "triton" else "compiled"

    @property
    def device(self) -> torch.device:
        return torch.device(_triton_device() if self.name == "triton" else self.name)

    @property
    def ops(self):
        """``torch.ops.isofast_C`` or ``torch.ops.isofast_triton``."""
        return backends.library(self.name)

    @property
    def dtypes(self) -> tuple[torch.dtype, ...]:
        return DTYPES if self.name in backends.FLOAT64_BACKENDS else DTYPES[1:]

    @property
    def keeps_draw(self) -> bool:
        """Whether public q_sample hands its draw to the loss (`NoiseKey.kept`)."""
        return self.name in backends.KEEPS_DRAW

    def pick(self, *, compiled, triton):
        """The value of this backend's family."""
        return triton if self.family == "triton" else compiled

    def skip_unless_takes(self, dtype: torch.dtype) -> None:
        if dtype not in self.dtypes:
            pytest.skip(f"backend {self.name!r} takes no {dtype} data (the ops layer sends it to the reference)")

    def __str__(self) -> str:
        return self.name


def _param(name: str):
    return pytest.param(name, id=name, marks=[pytest.mark.gpu] if name == "cuda" else [])


@pytest.fixture(params=[_param(n) for n in FUSED])
def backend(request) -> Backend:
    ok, reason = backends.status(request.param)
    if not ok:
        pytest.skip(f"backend {request.param!r} unavailable: {reason}")
    if request.param not in backends.fused(Backend(request.param).device.type):
        pytest.skip(f"backend {request.param!r} cannot run on {Backend(request.param).device} tensors here")
    return Backend(request.param)


def on(*names: str):
    """Narrow a test to the fused backends ``names`` (the ``backend`` fixture's other cases do not run)."""
    return pytest.mark.parametrize("backend", [_param(n) for n in names], indirect=True)


# The fuzz suites (test_fuzz_*.py): a bounded, repeatable run in CI; ISOFAST_FUZZ=long explores afresh
# (random examples, many more of them) for as long as one cares to wait.
FUZZ_LONG = os.environ.get("ISOFAST_FUZZ", "") == "long"


def fuzz_settings(ci_examples: int, long_examples: int) -> settings:
    """Hypothesis settings of a fuzz test: ``ci_examples`` derandomized, or ``long_examples`` fresh ones."""
    if FUZZ_LONG:
        return settings(max_examples=long_examples, deadline=None, derandomize=False, print_blob=True)
    return settings(max_examples=ci_examples, deadline=None, derandomize=True)


def check(max_examples: int, body: Callable, examples=(), **strategies) -> None:
    """Run ``body`` under hypothesis with ``strategies`` (and the explicit ``examples``, dicts of them).

    Inside the test, so that the example count may depend on the backend, and so that hypothesis does
    not see the test's function-scoped fixtures.
    """
    test = given(**strategies)(body)
    for ex in examples:
        test = example(**ex)(test)
    settings(max_examples=max_examples, deadline=None)(test)()


# ---------------------------------------------------------------- numbers
def acc(dtype: torch.dtype) -> torch.dtype:
    """The arithmetic (and table, and sums) dtype of data of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rand(shape, dtype: torch.dtype, gen: torch.Generator, scale: float = 1.0, device="cpu") -> torch.Tensor:
    """Normal data drawn in float64 from ``gen`` (repeatable per example), rounded to ``dtype``."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)


def close(got: torch.Tensor, want: torch.Tensor, tol: tuple[float, float], extra_atol: float = 0.0, msg=None) -> None:
    """assert_close in float64 with (rtol, atol + extra_atol)."""
    rtol, atol = tol
    torch.testing.assert_close(got.detach().cpu().to(torch.float64), want.detach().cpu().to(torch.float64),
                               rtol=rtol, atol=atol + extra_atol, msg=msg)


def eps_of(seed: int, offset: int, B: int, n: int, device="cpu") -> torch.Tensor:
    """The contract's (B, n) draw keyed by (seed, offset), by the reference implementation (float32)."""
    return noise.randn_contract(seed, offset, B * n, device).reshape(B, n)


def key_tensor(seed: int, offset: int, device="cpu") -> torch.Tensor:
    """The int64 (2,) key tensor the step kernels read."""
    return torch.tensor([noise.to_signed(seed), noise.to_signed(offset)], dtype=torch.int64, device=device)


LAYOUTS = ["contiguous", "transposed", "strided", "channels_last", "batch_stride"]


def laid_out(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x's values in a tensor with other strides (the kernels need row-major (B, n): ops must copy)."""
    if layout == "transposed" and x.ndim >= 2:
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "strided":  # every other element of a wider buffer
        big = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
        big[..., ::2] = x
        return big[..., ::2]
    if layout == "channels_last" and x.ndim == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "batch_stride":  # every other sample of a larger batch
        big = torch.zeros(2 * x.shape[0], *x.shape[1:], dtype=x.dtype, device=x.device)
        big[::2] = x
        return big[::2]
    return x


# The public ops against the reference: (rtol, atol) in the data dtype, as for the compiled primitives;
# hypothesis strategies of sample shapes (image-like and flat; row lengths: LENGTHS above).
PUBLIC_TOL = PRIMITIVE_TOL["compiled"]
IMAGE_SHAPES = st.sampled_from([(1, 1), (2, 2), (3, 5), (1, 3, 4, 4), (4, 3, 5, 3), (2, 7, 3)])
