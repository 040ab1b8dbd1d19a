"""Multi-process training: sharding of noise, the global batch penalty, and torchrun (gloo, 2 CPU processes) vs 1 process."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from isofast import NoiseKey, iso_ddpm_loss
from isofast import checkpoint as ck
from isofast import distributed as D
from isofast.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("global_batch, world, sample_shape", [
    (8, 2, (2,)), (6, 2, (2,)), (9, 3, (3,)), (12, 4, (1, 3, 3)), (5, 5, (7,)), (4, 1, (2, 2)),
])
def test_rank_noise_slices_are_the_global_draw(global_batch, world, sample_shape):
    """Every rank's noise is exactly its rows of the 1-process draw (a key where the slice allows)."""
    key = NoiseKey(seed=0xDEADBEEF12345, offset=17, shape=(global_batch, *sample_shape))
    n = torch.Size(sample_shape).numel()
    pieces = []
    for rank in range(world):
        rows = D.rank_rows(global_batch, rank, world)
        noise = D.rank_noise(key, rows)
        starts_on_counter = rows.start * n % 4 == 0
        assert isinstance(noise, NoiseKey) == starts_on_counter
        pieces.append(noise.materialize() if isinstance(noise, NoiseKey) else noise)
        assert pieces[-1].shape == (global_batch // world, *sample_shape)
    assert torch.equal(torch.cat(pieces), key.materialize())


def test_rank_rows_checks_its_arguments():
    assert D.rank_rows(12, 2, 3) == slice(8, 12)
    with pytest.raises(ValueError, match="divisible by the world size 5"):
        D.rank_rows(12, 0, 5)
    with pytest.raises(ValueError, match="rank must be in"):
        D.rank_rows(12, 3, 3)


def test_global_batch_iso_loss_is_the_batch_loss_in_one_process():
    """With no process group S = S_r: value and gradient of `iso_ddpm_loss(..., "batch")`."""
    key = NoiseKey(seed=11, offset=0, shape=(6, 3))
    pred = torch.randn(6, 3, requires_grad=True)
    loss, parts = D.global_batch_iso_loss(pred, key, 0.7)
    ref_pred = pred.detach().clone().requires_grad_()
    ref, ref_parts = iso_ddpm_loss(ref_pred, key, 0.7, "batch", return_parts=True)
    torch.testing.assert_close(loss, ref)
    for got, want in zip(parts, ref_parts, strict=True):
        torch.testing.assert_close(got, want)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(pred.grad, ref_pred.grad)


def test_single_process_environment(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = D.init_from_env("cpu")
    assert (info.rank, info.world_size, info.is_main, info.distributed) == (0, 1, True, False)
    assert D.all_gather_objects({"a": 1}) == [{"a": 1}]
    x = torch.ones(3)
    assert D.all_reduce_mean(x) is x
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="inconsistent torchrun environment"):
        D.env_world()


def _mlp_args(out, steps, extra=()):
    # global batch 6 -> 3 rows per rank: rank 1's noise starts mid-counter (the materialised path)
    return ["train", "--data", "swiss_roll", "--n-points", "200", "--steps", str(steps), "--batch-size", "6",
            "--T", "100", "--iso-lambda", "0.5", "--iso-mode", "batch", "--ckpt-every", "3", "--log-every", "2",
            "--ema-decay", "0.9", "--warmup", "2", "--mlp-hidden", "16", "--seed", "3", "--no-tensorboard",
            "--no-progress", "--out", str(out), *extra]


def _unet_args(out, steps):
    # a Dataset (digits) through the sharded batch sampler; 2 images per rank: noise stays a key
    return ["train", "--data", "digits", "--steps", str(steps), "--batch-size", "4", "--T", "50",
            "--iso-lambda", "0.3", "--iso-mode", "sample", "--ckpt-every", "3", "--log-every", "3",
            "--ema-decay", "0", "--seed", "1", "--no-tensorboard", "--no-progress", "--out", str(out)]


def _assert_close(a: dict, b: dict, what: str) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5, msg=f"{what}: {k}")


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the launched processes, so float results are comparable
    yield
    torch.set_num_threads(before)


def test_torchrun_two_cpu_processes_match_one_process_and_resume_with_one(tmp_path, one_thread):
    # `isofast train` itself under torchrun (it creates and ends the process group); the two launches run
    # concurrently to halve the wait for interpreter start-up. (One launch per run: re-initialising a
    # process group inside one torchrun process can pick up the previous group's stale store entries.)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "isofast.cli"]
    procs = [subprocess.Popen(launch + args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for args in (_mlp_args(tmp_path / "ddp_mlp", 6), _unet_args(tmp_path / "ddp_unet", 3))]
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-4000:]

    assert cli_main(_mlp_args(tmp_path / "one_mlp", 6)) == 0
    assert cli_main(_unet_args(tmp_path / "one_unet", 3)) == 0
    for name in ("mlp", "unet"):
        ddp, one = ck.load_checkpoint(tmp_path / f"ddp_{name}"), ck.load_checkpoint(tmp_path / f"one_{name}")
        assert ddp.step == one.step and ddp.meta["world_size"] == 2
        _assert_close(ddp.model, one.model, f"{name} weights, 2 processes vs 1")
        if one.ema is not None:
            _assert_close(ddp.ema, one.ema, f"{name} EMA, 2 processes vs 1")
    rows = (tmp_path / "ddp_mlp" / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["2", "4", "6"]  # rank 0 alone wrote the log
    assert not list((tmp_path / "ddp_mlp").glob("*.tmp"))

    # The 2-process checkpoint continues in 1 process exactly like the 1-process run would.
    assert cli_main(_mlp_args(tmp_path / "ddp_mlp", 9, ["--resume"])) == 0
    assert cli_main(_mlp_args(tmp_path / "one_mlp", 9, ["--resume"])) == 0
    _assert_close(ck.load_checkpoint(tmp_path / "ddp_mlp").model, ck.load_checkpoint(tmp_path / "one_mlp").model,
                  "resumed with 1 process after 2")


_COUNT_NO_SYNC = """
import json, os, sys
from torch.nn.parallel import DistributedDataParallel
from isofast.cli import main

entered = []
no_sync = DistributedDataParallel.no_sync

def counting_no_sync(self):
    entered.append(1)
    return no_sync(self)

DistributedDataParallel.no_sync = counting_no_sync
code = main(sys.argv[1:])
with open(os.environ["NO_SYNC_LOG"] + os.environ["RANK"], "w") as f:
    json.dump(len(entered), f)
sys.exit(code)
"""


def test_torchrun_grad_accum_skips_the_all_reduce_but_on_the_last_micro_batch(tmp_path, one_thread):
    """2 processes x 2 micro-batches take the 1-process steps (batch penalty of each micro-batch included), and
    each rank enters DDP's no_sync once per step: on the first micro-batch, not the last."""
    script = tmp_path / "count_no_sync.py"
    script.write_text(_COUNT_NO_SYNC)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "NO_SYNC_LOG": str(tmp_path / "no_sync_")}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    args = _mlp_args(tmp_path / "ddp", 4, ["--grad-accum", "2"])
    proc = subprocess.run(launch + args, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert cli_main(_mlp_args(tmp_path / "one", 4, ["--grad-accum", "2"])) == 0
    ddp, one = ck.load_checkpoint(tmp_path / "ddp"), ck.load_checkpoint(tmp_path / "one")
    assert ddp.meta["world_size"] == 2 and ddp.meta["config"]["grad_accum"] == 2
    _assert_close(ddp.model, one.model, "weights, 2 processes x 2 micro-batches vs 1 process x 2")
    _assert_close(ddp.ema, one.ema, "EMA, 2 processes x 2 micro-batches vs 1 process x 2")
    assert [int((tmp_path / f"no_sync_{rank}").read_text()) for rank in (0, 1)] == [4, 4]  # 4 steps, 1 each
