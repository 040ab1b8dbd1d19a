"""The op registrations: one schema per primitive on both libraries, and each op's fake (shape),
autograd and dispatch registrations held together by ``torch.library.opcheck``; which backends load.
"""
from __future__ import annotations

import pytest
import torch
from conftest import on

from isofast import kernels
from isofast.ops import backends, extension

PRIMITIVES = ("q_sample", "iso_sums", "iso_grad", "ddpm_step", "ddim_step")
CPU_ONLY = ("q_sample_noise", "iso_loss_tail", "philox_bits", "philox_randn")


def _schema(namespace: str, name: str) -> str:
    return str(getattr(getattr(torch.ops, namespace), name).default._schema).removeprefix(f"{namespace}::")


@pytest.mark.skipif(extension._C is None, reason=extension._IMPORT_ERROR or "isofast._C is not built")
@pytest.mark.parametrize("primitive", PRIMITIVES)
def test_triton_schemas_equal_compiled_schemas(primitive):
    # one contract, two libraries: isofast.ops calls either the same way
    assert _schema("isofast_triton", primitive) == _schema("isofast_C", primitive)
    assert _schema("isofast_triton", primitive) == primitive + kernels.SCHEMAS[primitive]


def test_triton_library_defines_exactly_the_primitives():
    assert set(kernels.SCHEMAS) == set(PRIMITIVES)
    for name in CPU_ONLY:
        assert not hasattr(torch.ops.isofast_triton, name), name


def test_library_names_the_namespace_of_each_backend():
    assert backends.library("triton") is torch.ops.isofast_triton
    assert backends.library("cpu") is torch.ops.isofast_C
    assert backends.library("cuda") is torch.ops.isofast_C


def test_available_reports_cpu():
    ok, reason = extension.available("cpu")
    if extension._C is None:
        assert not ok and reason == extension._IMPORT_ERROR
        return
    assert ok, reason
    ok, reason = extension.available("cuda")
    if not torch.cuda.is_available():
        assert not ok and reason
    assert backends.status("cpu") == extension.available("cpu")


def test_fused_lists_the_usable_backends_of_a_device():
    names = backends.fused("cpu")
    assert set(names) <= {"cpu", "triton"}
    assert ("cpu" in names) == backends.status("cpu")[0]
    assert "cuda" not in names
    if not torch.cuda.is_available():
        assert "cpu" not in backends.fused("cuda") and "cuda" not in backends.fused("cuda")


def _args(name: str, dtype: torch.dtype, device: torch.device, grad: bool, explicit: bool):
    """Small valid operands of ``name`` (tables of the arithmetic dtype; a decreasing alphas_cumprod)."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(0)

    def data(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).to(device)

    x, e = data(3, 7), data(3, 7)
    t = torch.tensor([0, 4, 2], device=device)
    ab = torch.linspace(0.99, 0.05, 5, dtype=torch.float64)
    sa, sb = ab.sqrt().to(acc).to(device), (1 - ab).sqrt().to(acc).to(device)
    c1, c2 = (torch.rand(3, generator=g, dtype=torch.float64).to(acc).to(device) for _ in range(2))
    key = torch.tensor([5, 2**40], device=device)
    e_arg = e.requires_grad_(grad) if explicit else None
    if name == "q_sample":
        return (x.requires_grad_(grad), t, sa, sb, e_arg, 5, 2**40)
    if name == "iso_sums":
        return (x.requires_grad_(grad), e_arg, 5, 2**40)
    if name == "iso_grad":
        return (x, e.detach() if explicit else None, 5, 2**40, c1, c2)
    if name == "ddpm_step":
        table = (torch.rand(5, 5, generator=g, dtype=torch.float64) + 0.1).to(acc).to(device)
        return (x, e, t, table, e.detach() if explicit else None, key, True)
    ddim = torch.stack([ab.rsqrt(), (1 / ab - 1).sqrt(), ab.sqrt(), (1 - ab).sqrt(), ab, 1 - ab])  # its (6, T) rows
    return (x, e, t, t - 1, ddim.to(acc).to(device), 0.5, e.detach() if explicit else None, key, False)


@pytest.mark.parametrize("explicit", [False, True], ids=["keyed", "explicit"])
@pytest.mark.parametrize("primitive", PRIMITIVES)
def test_opcheck_primitives(backend, primitive, explicit):
    """Schema, fake function, autograd registration and tracing (torch.compile's view) of each primitive."""
    dtypes = [torch.float32] + ([torch.float64] if torch.float64 in backend.dtypes else [])
    for dtype in dtypes:
        grad = primitive in ("q_sample", "iso_sums")  # the differentiable ones, with inputs that require grad
        args = _args(primitive, dtype, backend.device, grad, explicit)
        torch.library.opcheck(getattr(backend.ops, primitive).default, args)


@on("cpu")
def test_opcheck_cpu_only_ops(backend):
    x = torch.randn(3, 7, requires_grad=True)
    t = torch.tensor([0, 4, 2])
    ab = torch.linspace(0.99, 0.05, 5)
    ops = torch.ops.isofast_C
    torch.library.opcheck(ops.q_sample_noise.default, (x, t, ab.sqrt(), (1 - ab).sqrt(), 5, 2**40))
    sse = (torch.rand(3) * 7).requires_grad_()
    ssq = (torch.rand(3) * 7).requires_grad_()
    for w in (None, (torch.rand(3) + 0.5).requires_grad_()):
        for mode, reduction in (("batch", "mean"), ("sample", "sum"), ("sample", "none")):
            torch.library.opcheck(ops.iso_loss_tail.default, (sse, ssq, 7, w, 0.3, mode, reduction))
            torch.library.opcheck(ops.iso_loss_tail.default, (sse, ssq, 7, w, 0.0, mode, reduction,
                                                              torch.tensor([0.3, 1.0, 0.0])))
    torch.library.opcheck(ops.philox_bits.default, (torch.empty(9), 1, 2))
    torch.library.opcheck(ops.philox_randn.default, (torch.empty(9), 1, 2))
