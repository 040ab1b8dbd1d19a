"""pytest-benchmark suite of the fused ops, each beside its baselines, on this machine's device.

    pytest benchmarks/bench_ops.py --benchmark-only                      # everything
    pytest benchmarks/bench_ops.py --benchmark-only -k "noise_loss"      # one op
    pytest benchmarks/bench_ops.py --benchmark-only --benchmark-group-by=param:case
    pytest benchmarks/bench_ops.py --benchmark-only --bench-threads 1            # on a shared machine

The workloads are the rows of `throughput.py` at the small shape (B=64, 3x32x32, fp32): the same
inputs, rotated between calls, and the same correctness check before any timing (a wrong answer
fails the test instead of producing a number). Backends that cannot run here are skipped with
the reason. For ratios in one table, ``throughput.py`` is the tool; this suite is for tracking one
op over time (``--benchmark-autosave`` / ``--benchmark-compare``).
"""
from __future__ import annotations

import functools
import itertools
import os

import pytest
import torch
from _rows import Settings, ddpm_step_row, fused_backends, loss_row, noise_loss_row, q_sample_row

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPE = (64, 3, 32, 32)
VARIANTS = ["eager", "torch.compile", "isofast[triton]", "isofast[cuda]", "isofast[cpu]", "isofast[reference]"]
CASES = {
    "q_sample": lambda s: q_sample_row(s, "fp32", SHAPE, True),
    "loss_batch": lambda s: loss_row(s, "batch", "fp32", SHAPE, True, tensor_noise=False),
    "loss_sample": lambda s: loss_row(s, "sample", "fp32", SHAPE, True, tensor_noise=False),
    "noise_loss": lambda s: noise_loss_row(s, "fp32", SHAPE, True),
    "ddpm_step": lambda s: ddpm_step_row(s, "fp32", SHAPE, True),
}


@functools.cache
def _row(case: str):
    fused, report = fused_backends(DEVICE)
    return CASES[case](Settings(DEVICE, True, True, fused, 5)), report


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", list(CASES))
def test_op(benchmark, case, variant):
    row, report = _row(case)
    found = [v for v in row.variants if v.name == variant]
    if not found:
        backend = variant[len("isofast["):-1] if variant.startswith("isofast[") else variant
        pytest.skip(f"{variant} not run here: {report.get(backend, 'not a variant of this row')}")
    v = found[0]
    v.check()  # raises AssertionError on a wrong answer: never time a wrong fast path
    counter = itertools.count()

    def call():
        v.fn(next(counter) % row.n_inputs)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.group = case
    old = os.environ.get("ISOFAST_CHECK_VALUES")
    os.environ["ISOFAST_CHECK_VALUES"] = "0"  # no host-read validation of t inside the timed calls
    try:
        benchmark.pedantic(call, warmup_rounds=3, rounds=20, iterations=5)
    finally:
        if old is None:
            os.environ.pop("ISOFAST_CHECK_VALUES")
        else:
            os.environ["ISOFAST_CHECK_VALUES"] = old
