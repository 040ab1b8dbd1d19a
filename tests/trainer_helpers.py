"""Small runs shared by the Trainer and resume tests: a tiny MLP on 40 points, a config of a few steps."""
import pytest
import torch

from isofast.models.mlp import TimeMLP
from isofast.train import TrainConfig


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Autouse in a test module that imports it: one torch thread for the module's tests. Tiny models: extra
    OpenMP threads only add contention on a shared CPU, and the subprocess runs of the tests use one thread too,
    so in-process and subprocess float results are comparable bit for bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_config(out, **kw) -> TrainConfig:
    base = dict(out_dir=str(out), steps=10, batch_size=8, lr=1e-2, T=50, log_every=5, ckpt_every=5,
                progress=False, logger="csv")
    base.update(kw)
    return TrainConfig(**base)


def tiny_mlp(seed=0, **kw) -> TimeMLP:
    torch.manual_seed(seed)
    return TimeMLP(**{"hidden": 16, "emb_dim": 8, **kw})


def toy_points(n=40, seed=1) -> torch.Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed)) * 0.5


def assert_bitwise(a: dict, b: dict, what: str) -> None:
    assert sorted(a) == sorted(b), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs (max |diff| {(a[k].float() - b[k].float()).abs().max()})"
