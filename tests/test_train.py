"""The Trainer: the step it takes, the run folder it writes, and exact resume (in-process and after SIGKILL)."""
import copy
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from trainer_helpers import assert_bitwise, one_thread, tiny_config, tiny_mlp, toy_points  # noqa: F401 (autouse fixture)

from isofast import NoiseKey, NoiseSchedule, reference
from isofast import checkpoint as ck
from isofast.cli import main as cli_main
from isofast.data.order import epoch_permutation, make_noise_generator
from isofast.ema import EMA
from isofast.train import TrainConfig, Trainer
from isofast.train_stats import METRIC_FIELDS

REPO = Path(__file__).resolve().parents[1]


def _optimizer_tensors(state: dict) -> dict:
    return {f"{i}.{k}": v for i, s in state["optimizer"]["state"].items() for k, v in s.items()}


def test_trainer_rejects_bad_inputs(tmp_path):
    with pytest.raises(TypeError, match="model"):
        Trainer("mlp", toy_points(), tiny_config(tmp_path))
    with pytest.raises(TypeError, match="data"):
        Trainer(tiny_mlp(), [1, 2], tiny_config(tmp_path))
    with pytest.raises(ValueError, match="batch_size=8 exceeds the dataset size 5"):
        Trainer(tiny_mlp(), toy_points(5), tiny_config(tmp_path))
    with pytest.raises(ValueError, match="tensor data"):
        Trainer(tiny_mlp(), torch.arange(10), tiny_config(tmp_path))


# ----- the step ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("iso_mode", ["batch", "sample"])
def test_first_step_equals_the_reference_step(tmp_path, iso_mode):
    """Batch, t, noise, q_sample, loss and Adam, rebuilt from the reference ops, give the trainer's weights."""
    data, lam, lr = toy_points(), 0.7, 1e-2
    model = tiny_mlp()
    ref_model = copy.deepcopy(model)
    cfg = tiny_config(tmp_path, steps=1, lr=lr, grad_clip=None, ema_decay=0.0, iso_lambda=lam, iso_mode=iso_mode,
                  seed=3)
    Trainer(model, data, cfg).fit()

    gen = make_noise_generator(cfg.seed)
    x0 = data[epoch_permutation(len(data), cfg.seed, 0)[: cfg.batch_size]]
    t = torch.randint(0, cfg.T, (cfg.batch_size,), generator=gen)
    eps = NoiseKey.draw(x0.shape, generator=gen).materialize()
    x_t = reference.q_sample(x0, t, NoiseSchedule.linear(cfg.T), eps)
    loss, _ = reference.iso_ddpm_loss(ref_model(x_t, t), eps, lam, iso_mode)
    opt = torch.optim.Adam(ref_model.parameters(), lr=lr)
    loss.backward()
    opt.step()
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(model.out.weight, copy.deepcopy(tiny_mlp()).out.weight)  # it did train


def test_lr_warmup_and_ema(tmp_path):
    trainer = Trainer(tiny_mlp(), toy_points(), tiny_config(tmp_path, warmup_steps=4, lr=0.1))
    assert [trainer.lr_at(k) for k in range(6)] == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1])
    src, ema = nn.Linear(3, 2), None
    ema = EMA(src, decay=0.9, warmup=False)
    before = ema.module.weight.clone()
    with torch.no_grad():
        src.weight.add_(1.0)
    ema.update(src, step=0)
    torch.testing.assert_close(ema.module.weight, 0.9 * before + 0.1 * src.weight)
    assert EMA(src, 0.999, warmup=True).decay_at(0) == pytest.approx(0.1)
    assert not any(p.requires_grad for p in ema.module.parameters())


# ----- the run folder --------------------------------------------------------------------------------------
def test_run_folder_has_every_artefact(tmp_path):
    out = tmp_path / "run"
    calls = []

    def sample_fn(model, step):
        calls.append(step)
        assert not model.training
        return torch.rand(4, 3, 8, 8) * 2 - 1

    trainer = Trainer(tiny_mlp(), toy_points(), tiny_config(out, steps=12, log_every=5, ckpt_every=5, sample_every=5,
                                                    tensorboard=True, iso_lambda=0.3), sample_fn=sample_fn)
    trainer.fit()
    assert trainer.step == 12 and calls == [5, 10, 12]
    assert TrainConfig.from_dict(json.loads((out / "config.json").read_text())) == trainer.config
    assert json.loads((out / "model.json").read_text())["kind"] == "mlp"
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [5, 10, 12] and tuple(rows[0]) == METRIC_FIELDS
    for r in rows:
        values = {k: float(v) for k, v in r.items()}
        assert values["mse"] > 0 and values["isotropy"] > 0 and values["steps_per_s"] > 0
        assert values["loss"] == pytest.approx(values["mse"] + 0.3 * values["iso_penalty"], rel=1e-4)
    assert trainer.tensorboard_status == "on" and list(out.glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (out / "samples").iterdir()) == [
        "step_0000005.png", "step_0000010.png", "step_0000012.png"]
    assert [p.name for p in ck.list_checkpoints(out / "checkpoints")] == ["step_0000010", "step_0000012"]
    model, sched, meta = ck.load_trained_model(out, which="ema")
    assert_bitwise(model.state_dict(), trainer.ema_model.state_dict(), "EMA weights")
    assert sched.T == 50 and meta["step"] == 12


def test_sampling_a_grid_shows_on_the_bar_and_as_a_line(tmp_path, monkeypatch, capsys):
    # a grid can take longer than many steps: the bar must not sit frozen without a word
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    out = tmp_path / "run"
    trainer = Trainer(tiny_mlp(), toy_points(), tiny_config(out, steps=6, sample_every=5, progress=True),
                      sample_fn=lambda model, step: torch.randn(30, 2))
    trainer.fit()
    err = capsys.readouterr().err
    assert "train: sampling a grid at step 5" in err
    assert f"step 5: sample grid {out / 'samples' / 'step_0000005.png'}" in err
    assert "isotropy=" in err and "iso=" not in err  # the bar's name for the measured isotropy


def test_refuses_to_overwrite_a_run_and_resume_without_checkpoint_starts_fresh(tmp_path):
    Trainer(tiny_mlp(), toy_points(), tiny_config(tmp_path, steps=5)).fit()
    with pytest.raises(FileExistsError, match="resume"):
        Trainer(tiny_mlp(), toy_points(), tiny_config(tmp_path, steps=5)).fit()
    fresh = Trainer(tiny_mlp(), toy_points(), tiny_config(tmp_path / "new", steps=5)).fit(resume=True)
    assert fresh.step == 5


def test_unwritable_out_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(PermissionError, match="is not writable"):
        Trainer(tiny_mlp(), toy_points(), tiny_config(blocker / "run")).fit()


def test_resume_into_another_model_names_the_mismatch(tmp_path):
    Trainer(tiny_mlp(), toy_points(), tiny_config(tmp_path, steps=5)).fit()
    other = Trainer(tiny_mlp(hidden=24), toy_points(), tiny_config(tmp_path, steps=10))
    with pytest.raises(ck.CheckpointError, match=r"model\.safetensors.*layers\.0\.weight: checkpoint \(16, 2\) vs model \(24, 2\)"):
        other.fit(resume=True)


def test_resume_from_a_corrupted_latest_names_the_file_and_the_previous_checkpoint(tmp_path):
    Trainer(tiny_mlp(), toy_points(), tiny_config(tmp_path, steps=10, ckpt_every=5)).fit()
    bad = tmp_path / "checkpoints" / "step_0000010" / "ema.safetensors"
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(ck.CheckpointError, match=r"ema\.safetensors is truncated.*step_0000005"):
        Trainer(tiny_mlp(), toy_points(), tiny_config(tmp_path, steps=20)).fit(resume=True)
    resumed = Trainer(tiny_mlp(), toy_points(), tiny_config(tmp_path, steps=12)).fit(
        resume=tmp_path / "checkpoints" / "step_0000005")
    assert resumed.step == 12


# ----- exact resume -----------------------------------------------------------------------------------------
class _NoisyPoints(torch.utils.data.Dataset):
    """A Dataset whose items use torch's global RNG (augmentation), returned as (x, label) tuples."""

    def __init__(self, points):
        self.points = points

    def __len__(self):
        return len(self.points)

    def __getitem__(self, i):
        return self.points[i] + 0.01 * torch.randn(2), 0


class _DropoutMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = tiny_mlp()
        self.drop = nn.Dropout(0.2)

    def forward(self, x, t):
        return self.drop(self.mlp(x, t))


@pytest.mark.parametrize("kind", ["tensor", "dataset"])
def test_stop_and_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path, kind):
    def data():
        return toy_points() if kind == "tensor" else _NoisyPoints(toy_points())

    def model():
        return tiny_mlp() if kind == "tensor" else _DropoutMLP()

    kw = dict(iso_lambda=0.3, warmup_steps=3, grad_clip=0.5, ema_decay=0.9, log_every=4, ckpt_every=7, seed=5)
    full = Trainer(model(), data(), tiny_config(tmp_path / "full", steps=16, **kw)).fit()
    Trainer(model(), data(), tiny_config(tmp_path / "split", steps=7, **kw)).fit()  # stops at 7 (> one epoch: 5)
    split = Trainer(model(), data(), tiny_config(tmp_path / "split", steps=16, **kw)).fit(resume=True)
    assert_bitwise(full.model.state_dict(), split.model.state_dict(), "model")
    assert_bitwise(full.ema_model.state_dict(), split.ema_model.state_dict(), "EMA")
    a = ck.load_checkpoint(tmp_path / "full").state
    b = ck.load_checkpoint(tmp_path / "split").state
    assert_bitwise(_optimizer_tensors(a), _optimizer_tensors(b), "optimizer")
    assert torch.equal(a["rng"]["generators"]["noise"], b["rng"]["generators"]["noise"])
    rows = [line.split(",")[0] for line in (tmp_path / "split" / "metrics.csv").read_text().splitlines()[1:]]
    assert rows == ["4", "8", "12", "16"]


def _cli_args(out, steps):
    return ["train", "--data", "swiss_roll", "--n-points", "300", "--steps", str(steps), "--batch-size", "16",
            "--ckpt-every", "25", "--log-every", "25", "--T", "100", "--iso-lambda", "0.3", "--warmup", "10",
            "--ema-decay", "0.99", "--mlp-hidden", "32", "--seed", "7", "--no-tensorboard", "--no-progress",
            "--out", str(out)]


def test_sigkill_mid_run_then_resume_is_bitwise_equal(tmp_path):
    # The killed run is asked for far more steps than it gets to do, so it is always alive when killed;
    # both finishing runs then stop 50 steps after the kill point (nothing in a step depends on the total).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    killed = tmp_path / "killed"
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "isofast.cli", *_cli_args(killed, 100_000)], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    latest = killed / "checkpoints" / "latest"
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline:
            if latest.exists() and latest.read_text().strip() >= "step_0000050":
                break
            if proc.poll() is not None:
                pytest.fail(f"training process exited early: {(tmp_path / 'killed.log').read_text()[-2000:]}")
            time.sleep(0.005)
        else:
            pytest.fail("no checkpoint appeared within 180 s")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL
    stopped_at = ck.load_checkpoint(killed).step
    assert stopped_at >= 50
    steps = stopped_at + 50

    assert cli_main(_cli_args(killed, steps) + ["--resume"]) == 0
    assert cli_main(_cli_args(tmp_path / "uninterrupted", steps)) == 0
    a, b = ck.load_checkpoint(killed), ck.load_checkpoint(tmp_path / "uninterrupted")
    assert a.step == b.step == steps
    assert_bitwise(a.model, b.model, "model")
    assert_bitwise(a.ema, b.ema, "EMA")
    assert_bitwise(_optimizer_tensors(a.state), _optimizer_tensors(b.state), "optimizer")
    logged = [int(line.split(",")[0]) for line in (killed / "metrics.csv").read_text().splitlines()[1:]]
    # rows the killed run wrote past its checkpoint were dropped and written again, once
    assert logged == list(range(25, steps + 1, 25)) + ([steps] if steps % 25 else [])


# ----- the command line --------------------------------------------------------------------------------------
def test_cli_trains_a_unet_on_digits_with_bf16_channels_last_and_sample_grids(tmp_path):
    out = tmp_path / "digits"
    args = ["train", "--data", "digits", "--steps", "4", "--batch-size", "4", "--T", "10", "--log-every", "2",
            "--ckpt-every", "2", "--sample-every", "4", "--sample-count", "4", "--precision", "bf16",
            "--channels-last", "--iso-lambda", "0.3", "--no-progress", "--out", str(out)]
    assert cli_main(args) == 0
    assert (out / "samples" / "step_0000004.png").exists()
    assert list(out.glob("events.out.tfevents.*"))
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["2", "4"] and all(float(r["loss"]) > 0 for r in rows)
    model, _, meta = ck.load_trained_model(out)
    assert meta["config"]["precision"] == "bf16" and model.config.in_channels == 1
    assert model(torch.zeros(2, 1, 8, 8), torch.tensor([1, 2])).shape == (2, 1, 8, 8)


def test_cli_rejects_negative_iso_lambda_and_unknown_data(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(["train", "--iso-lambda", "-0.5", "--out", str(tmp_path)])
    assert info.value.code == 2 and "--iso-lambda: must be a finite number >= 0" in capsys.readouterr().err
    assert cli_main(["train", "--data", "mnist", "--out", str(tmp_path)]) == 2
    assert "unknown --data 'mnist'" in capsys.readouterr().err
