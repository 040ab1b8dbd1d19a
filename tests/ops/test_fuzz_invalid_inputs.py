"""Fuzz: every public entry point refuses bad arguments with a ValueError or TypeError naming the argument.

Hypothesis picks an entry point, one of its arguments and a bad value for it (the rest stay valid), and,
for the ops, a backend; anything but a ValueError/TypeError whose message names the argument fails:
an AttributeError from deep inside, a RuntimeError from a kernel's own check, a crash, or no error.
CI runs a bounded, repeatable sample; ISOFAST_FUZZ=long a fresh and larger one (conftest.fuzz_settings).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from conftest import fuzz_settings
from hypothesis import given
from hypothesis import strategies as st

import isofast
from isofast import NoiseKey, NoiseSchedule, sampling
from isofast.ops import backends

T = 10
SCHED = NoiseSchedule.linear(T)
B, SHAPE = 2, (2, 3)
NAN, INF = math.nan, math.inf


def _x() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))


# bad values shared by several arguments
BAD_DATA = [None, "x", 3.0, [1.0, 2.0], np.ones(SHAPE, dtype=np.float32), torch.ones(SHAPE, dtype=torch.int64),
            torch.ones(SHAPE, dtype=torch.bool), torch.ones(SHAPE, dtype=torch.complex64), torch.ones(0, 3),
            torch.ones(()), torch.ones(2, 0)]
BAD_LIKE_DATA = [torch.ones(3, 3), torch.ones(2, 4), torch.ones(2, 3, 1), torch.ones(SHAPE, dtype=torch.float64)]
BAD_T = [-1, T, 2**70, 1.5, "1", None, True, np.float64(1.0), np.bool_(True), torch.tensor([1.0, 2.0]),
         torch.tensor([1, 2, 3]), torch.tensor([-1, 0]), torch.tensor([0, T]), torch.tensor([[1, 2]]),
         torch.tensor([True, False])]
BAD_SCHED = [None, "linear", 10, SCHED.betas]
BAD_NOISE = ["x", 3, [0.0] * 6, torch.ones(3, 3), torch.ones(SHAPE, dtype=torch.int64), torch.ones(SHAPE, dtype=torch.complex64),
             NoiseKey(1, 0, (3, 3)), NoiseKey(1, 0, (6,)), NoiseKey(1, 0, SHAPE, device="meta")]
BAD_NONNEG = [-0.1, NAN, INF, -INF, "0.3", None, True, np.float32(-1.0), torch.tensor(0.3), 1j]
BAD_SNR_GAMMA = [0, 0.0, -1.0, NAN, INF, -INF, "5", True, np.float32(-2.0), torch.tensor(5.0), 1j]
BAD_FLAG = ["yes", "no", None, 1, 0.0]
BAD_BACKEND = ["bogus", 3, ["cpu"], "CPU"]
BAD_GENERATOR = ["g", 3, torch.ones(1)]
BAD_BETA = [0, 0.0, 1, 1.0, -0.1, NAN, INF, "x", None, True]


def _ops_backends() -> list[str]:
    return ["reference", *backends.fused("cpu")]


@dataclass(frozen=True)
class Entry:
    """An entry point: ``call(**kwargs)``, valid ``kwargs()``, and per argument the bad values and the
    words one of which its message must contain as a word (the argument's name, or what it is called there)."""

    call: object
    kwargs: object
    bad: dict
    names: dict
    takes_backend: bool = False


def _sample_model(x, t):
    return 0.1 * x


ENTRIES = {
    "q_sample": Entry(
        isofast.q_sample, lambda: dict(x0=_x(), t=torch.tensor([1, 2]), sched=SCHED),
        dict(x0=BAD_DATA, t=BAD_T, sched=BAD_SCHED, noise=BAD_NOISE, generator=BAD_GENERATOR, backend=BAD_BACKEND),
        {}, takes_backend=True),
    "iso_ddpm_loss": Entry(
        isofast.iso_ddpm_loss, lambda: dict(eps_pred=_x(), noise=_x()),
        dict(eps_pred=BAD_DATA, noise=BAD_NOISE, iso_lambda=BAD_NONNEG, iso_mode=["foo", None, 3, ["batch"], "Batch"],
             reduction=["foo", None, 3, "none"], weights=[[1.0, 1.0], torch.ones(3), torch.ones(SHAPE),
                                                          torch.ones(B, dtype=torch.int64), "w"],
             groups=[0, -1, 3, 1.5, True, "2", np.float64(2.0)], return_parts=BAD_FLAG, backend=BAD_BACKEND),
        {}, takes_backend=True),
    # v- and x0-prediction need x0, t and the schedule; min-SNR weights t and the schedule (here as keywords
    # beside a noise tensor: a NoiseKey from q_sample carries them)
    "iso_ddpm_loss v_prediction": Entry(
        isofast.iso_ddpm_loss, lambda: dict(eps_pred=_x(), noise=_x(), prediction_type="v_prediction", x0=_x(),
                                            t=torch.tensor([1, 2]), schedule=SCHED, snr_gamma=5.0),
        dict(prediction_type=["eps", "v", "x0", "V_prediction", None, 3, ["sample"]], snr_gamma=BAD_SNR_GAMMA,
             x0=BAD_DATA + BAD_LIKE_DATA[:3], t=BAD_T, schedule=BAD_SCHED),
        {}, takes_backend=True),
    "iso_ddpm_loss sample": Entry(
        isofast.iso_ddpm_loss, lambda: dict(eps_pred=_x(), noise=_x(), prediction_type="sample", x0=_x(),
                                            t=torch.tensor([1, 2]), schedule=SCHED),
        dict(x0=[None, torch.ones(2, 4)], t=[None, torch.tensor([0, T])], schedule=[None, "linear"]),
        {}, takes_backend=True),
    "iso_ddpm_loss epsilon min-SNR": Entry(
        isofast.iso_ddpm_loss, lambda: dict(eps_pred=_x(), noise=_x(), snr_gamma=5.0, t=torch.tensor([1, 2]),
                                            schedule=SCHED),
        dict(snr_gamma=BAD_SNR_GAMMA, t=[None, -1, torch.tensor([1, 2, 3])], schedule=[None, 10]),
        {}, takes_backend=True),
    "ddpm_step": Entry(
        isofast.ddpm_step, lambda: dict(x_t=_x(), eps_pred=_x(), t=torch.tensor([3, 0]), sched=SCHED),
        dict(x_t=BAD_DATA, eps_pred=BAD_DATA + BAD_LIKE_DATA, t=BAD_T, sched=BAD_SCHED, noise=BAD_NOISE,
             clip_x0=BAD_FLAG, variance=["learned", None, 3], generator=BAD_GENERATOR, backend=BAD_BACKEND),
        {}, takes_backend=True),
    "ddim_step": Entry(
        isofast.ddim_step, lambda: dict(x_t=_x(), eps_pred=_x(), t=torch.tensor([5, 3]), t_prev=torch.tensor([2, -1]),
                                        sched=SCHED, eta=0.5),
        dict(x_t=BAD_DATA, eps_pred=BAD_DATA + BAD_LIKE_DATA, t=BAD_T, sched=BAD_SCHED, noise=BAD_NOISE,
             t_prev=[5, 6, -2, T, 1.5, "1", None, torch.tensor([5, 3]), torch.tensor([6, 2]), torch.tensor([-2, 0])],
             eta=BAD_NONNEG, clip_x0=BAD_FLAG, generator=BAD_GENERATOR, backend=BAD_BACKEND),
        {}, takes_backend=True),
    "isotropy": Entry(isofast.isotropy, lambda: dict(x=_x()), dict(x=BAD_DATA), {}),
    "NoiseKey": Entry(
        NoiseKey, lambda: dict(seed=1, offset=0, shape=SHAPE),
        dict(seed=[-1, 2**64, 1.5, "1", None, True, np.float64(1.0)], offset=[-1, 2**64, 1.5, None, False],
             shape=[(2, -3), (2.5,), "23", 5, None, (True,), (2, None)],
             dtype=[torch.int64, torch.bool, torch.complex64, "float32", None],
             device=["nowhere", 3.14, "cuda:x"]),
        {"shape": ("shape",), "dtype": ("dtype",), "device": ("device",)}),
    "NoiseSchedule.linear": Entry(
        NoiseSchedule.linear, lambda: dict(T=T),
        dict(T=[0, -1, 1.5, "10", None, True], beta_start=BAD_BETA, beta_end=BAD_BETA,
             dtype=[torch.int64, torch.bool, torch.complex64, torch.complex128, "float32", None]),
        {}),
    "NoiseSchedule.scaled_linear": Entry(
        NoiseSchedule.scaled_linear, lambda: dict(T=T), dict(T=[0, 2.5], beta_start=BAD_BETA, beta_end=BAD_BETA), {}),
    "NoiseSchedule.cosine": Entry(
        NoiseSchedule.cosine, lambda: dict(T=T),
        dict(T=[0, "3"], s=[-0.1, NAN, INF, "x", None], max_beta=BAD_BETA), {}),
    "NoiseSchedule.from_betas": Entry(
        NoiseSchedule.from_betas, lambda: dict(betas=torch.linspace(1e-4, 0.02, T)),
        dict(betas=[[0.5, 1.0], [], [[0.1]], "abc", None, [0.0], [NAN], [-0.1], [0.1, INF],
                    torch.tensor([0.1, 0.2], dtype=torch.complex64), torch.full((2000,), 0.5), torch.tensor([True])],
             dtype=[torch.int64, torch.complex64, "float64"]),
        {}),
    "NoiseSchedule.from_name": Entry(
        NoiseSchedule.from_name, lambda: dict(name="cosine", T=T),
        dict(name=["foo", None, 3], T=[0, -1, "10", 2.5, None]), {"name": ("schedule",)}),
    "ddpm_sample": Entry(
        sampling.ddpm_sample, lambda: dict(model=_sample_model, shape=SHAPE, sched=SCHED, progress=False),
        dict(model=[None, 3, lambda x, t: 3, lambda x, t: x[:1], lambda x, t: x.reshape(-1)],
             shape=[(2, -3), (), "23", (2.5,), None, (0, 3), [True, 2]], sched=BAD_SCHED,
             variance=["learned", None], dtype=[torch.int64, "x", None], device=["nowhere", 3.5],
             generator=BAD_GENERATOR, batch_size=[0, -1, 1.5, True], backend=BAD_BACKEND),
        {}),
    "ddim_sample": Entry(
        sampling.ddim_sample, lambda: dict(model=_sample_model, shape=SHAPE, sched=SCHED, steps=5, progress=False),
        dict(steps=[0, T + 1, 1.5, True, "5", None], eta=[-0.1, NAN, INF, "0", None, True], sched=BAD_SCHED,
             shape=[(2, -3), ()], generator=BAD_GENERATOR),
        {}),
}

CASES = [(entry, arg) for entry, e in ENTRIES.items() for arg in e.bad]


@st.composite
def _cases(draw):
    entry_name, arg = draw(st.sampled_from(CASES))
    entry = ENTRIES[entry_name]
    bad = draw(st.sampled_from(entry.bad[arg]))
    backend = draw(st.sampled_from(_ops_backends())) if entry.takes_backend and arg != "backend" else None
    return entry_name, arg, bad, backend


def _invalid_call(entry_name: str, arg: str, bad: object, backend: str | None):
    entry = ENTRIES[entry_name]
    kwargs = entry.kwargs()
    if backend is not None:
        kwargs["backend"] = backend
    kwargs[arg] = bad
    with pytest.raises((ValueError, TypeError)) as info:
        entry.call(**kwargs)
    names = entry.names.get(arg, (arg,))
    assert any(re.search(rf"\b{re.escape(name)}\b", str(info.value)) for name in names), (
        f"{entry_name}({arg}={bad!r}, backend={backend}): {type(info.value).__name__}: {info.value} names none of {names}")


@fuzz_settings(ci_examples=150, long_examples=5000)
@given(case=_cases())
def test_every_public_entry_point_refuses_bad_arguments_by_name(case):
    _invalid_call(*case)


@pytest.mark.parametrize("entry_name,arg", CASES, ids=[f"{e}-{a}" for e, a in CASES])
def test_each_bad_value_of_each_argument(entry_name, arg):
    """Every listed bad value once, on the reference and the CPU backends (the draw above mixes backends)."""
    for bad in ENTRIES[entry_name].bad[arg]:
        for backend in (_ops_backends() if ENTRIES[entry_name].takes_backend and arg != "backend" else [None]):
            if backend == "triton":
                continue  # the interpreter is slow; the hypothesis draw covers Triton
            _invalid_call(entry_name, arg, bad, backend)
