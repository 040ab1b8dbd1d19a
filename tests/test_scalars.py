"""numpy scalars are taken wherever Python ints and floats are; bools nowhere (issue 14)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import isofast
from isofast import NoiseKey, NoiseSchedule, scalars

SCHED = NoiseSchedule.linear(20)


@pytest.mark.parametrize("value", [3, np.int64(3), np.int32(3), np.uint8(3)])
def test_integers(value):
    assert scalars.is_integer(value) and scalars.integer("k", value) == 3 and type(scalars.integer("k", value)) is int


@pytest.mark.parametrize("value", [True, np.bool_(True), 3.0, np.float32(3), "3", None, torch.tensor(3)])
def test_not_integers(value):
    with pytest.raises(TypeError, match="k must be an int"):
        scalars.integer("k", value)


@pytest.mark.parametrize("value", [0.5, 1, np.float32(0.5), np.float64(0.5), np.float16(0.5), np.int64(1)])
def test_reals(value):
    assert type(scalars.real("x", value)) is float and scalars.real("x", value) == float(value)


@pytest.mark.parametrize("value", [True, np.bool_(False), "0.5", None, torch.tensor(0.5), 1j])
def test_not_reals(value):
    with pytest.raises(TypeError, match="x must be a float"):
        scalars.real("x", value)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_public_ops_take_numpy_scalars_like_python_ones(backend):
    """np.int64 t/T/seed and np.float32 lambda/eta were refused while np.float64 (a float subclass) was taken."""
    x0 = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    key = NoiseKey(np.uint64(7), np.int64(0), x0.shape)
    assert torch.equal(isofast.q_sample(x0, np.int64(5), SCHED, key, backend=backend)[0],
                       isofast.q_sample(x0, 5, SCHED, NoiseKey(7, 0, x0.shape), backend=backend)[0])
    p = torch.randn(4, 6)
    got = isofast.iso_ddpm_loss(p, key, iso_lambda=np.float32(0.25), backend=backend)
    want = isofast.iso_ddpm_loss(p, NoiseKey(7, 0, x0.shape), iso_lambda=0.25, backend=backend)
    assert torch.equal(got, want)
    assert torch.equal(isofast.ddpm_step(x0, p, np.int64(4), SCHED, key, backend=backend),
                       isofast.ddpm_step(x0, p, 4, SCHED, key, backend=backend))
    assert torch.equal(isofast.ddim_step(x0, p, np.int64(9), np.int32(-1), SCHED, np.float32(0.5), key, backend=backend),
                       isofast.ddim_step(x0, p, 9, -1, SCHED, 0.5, key, backend=backend))


@pytest.mark.parametrize("value", [True, np.bool_(True)])
def test_flags_take_python_and_numpy_bools(value):
    assert scalars.is_bool(value)
    x = torch.randn(2, 3)
    assert torch.equal(isofast.ddpm_step(x, x, 3, SCHED, NoiseKey(1, 0, x.shape), clip_x0=value),
                       isofast.ddpm_step(x, x, 3, SCHED, NoiseKey(1, 0, x.shape), clip_x0=True))


def test_bools_stay_refused_where_numbers_belong():
    x0 = torch.randn(2, 3)
    with pytest.raises(TypeError, match="iso_lambda must be a float"):
        isofast.iso_ddpm_loss(x0, x0, iso_lambda=np.bool_(True))
    with pytest.raises(TypeError, match="t must be an int"):
        isofast.q_sample(x0, np.bool_(True), SCHED)
    with pytest.raises(TypeError, match="eta must be a float"):
        isofast.ddim_step(x0, x0, 3, 1, SCHED, True)


def test_samplers_take_numpy_scalars_like_python_ones():
    from isofast.sampling import ddim_sample

    def model(x, t):
        return 0.1 * x

    want = ddim_sample(model, (3, 2), SCHED, steps=4, eta=0.5, generator=torch.Generator().manual_seed(0),
                       batch_size=2, progress=False)
    got = ddim_sample(model, (np.int64(3), np.int32(2)), SCHED, steps=np.int64(4), eta=np.float32(0.5),
                      generator=torch.Generator().manual_seed(0), batch_size=np.int64(2), progress=False)
    assert torch.equal(got, want)
