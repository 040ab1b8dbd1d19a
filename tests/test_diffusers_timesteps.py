"""A diffusers model that declares another T (its config's num_train_timesteps) than the schedule it is trained,
sampled or exported with is refused with a ValueError naming the argument; the same T is accepted."""
import json

import pytest
import torch

from isofast import NoiseSchedule
from isofast.cli import main
from isofast.sampling import ddim_sample, ddpm_sample
from isofast.train import TrainConfig, Trainer

pytest.importorskip("diffusers")
from diffusers_helpers import TINY_UNET2D  # noqa: E402

from isofast.diffusers_bridge.models import DiffusersUNet2D  # noqa: E402

# a "learned" time embedding has num_train_timesteps rows: the T the model is made for
LEARNED_20 = {**TINY_UNET2D, "time_embedding_type": "learned", "num_train_timesteps": 20}


def _train_args(out, config_path, *extra):
    return ["train", "--data", "digits", "--model", "diffusers-unet2d", "--model-config", str(config_path),
            "--batch-size", "4", "--steps", "1", "--ckpt-every", "1", "--no-tensorboard", "--no-progress",
            "--out", str(out), *extra]


@pytest.fixture
def learned_20(tmp_path):
    path = tmp_path / "learned20.json"
    path.write_text(json.dumps(LEARNED_20))
    return path


def test_train_refuses_a_model_config_of_another_T(learned_20, tmp_path, capsys):
    # --T 30 would index the 20-row embedding out of range; --T 10 would train silently on a model for 20
    for T in ("30", "10"):
        capsys.readouterr()
        assert main(_train_args(tmp_path / f"run{T}", learned_20, "--T", T)) == 2
        err = capsys.readouterr().err
        assert f"--T is {T}, but --model-config {learned_20} declares num_train_timesteps 20" in err, err
        assert "Traceback" not in err
        assert not (tmp_path / f"run{T}" / "checkpoints").exists()
    assert main(_train_args(tmp_path / "run20", learned_20, "--T", "20")) == 0  # the same T trains


def test_resume_refuses_overriding_T_away_from_the_models(learned_20, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_train_args(run, learned_20, "--T", "20")) == 0
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--steps", "2", "--T", "30", "--override", "T",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--T is 30, but the run's UNet2DModel config declares num_train_timesteps 20" in err, err


def test_trainer_refuses_a_model_of_another_T(tmp_path):
    config = TrainConfig(out_dir=str(tmp_path / "run"), steps=1, batch_size=4, T=30, progress=False,
                         tensorboard=False)
    with pytest.raises(ValueError, match="TrainConfig.T is 30, but the model's UNet2DModel config declares "
                                         "num_train_timesteps 20"):
        Trainer(DiffusersUNet2D(LEARNED_20), torch.zeros(8, 1, 8, 8), config)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_samplers_refuse_a_schedule_of_another_T_than_the_models(sampler):
    model = DiffusersUNet2D(LEARNED_20).eval()
    sample = {"ddpm": lambda m, s: ddpm_sample(m, (1, 1, 8, 8), s, progress=False),
              "ddim": lambda m, s: ddim_sample(m, (1, 1, 8, 8), s, steps=2, progress=False)}[sampler]
    # the mismatch of the issue: the schedule read from a diffusers scheduler of another T
    other = NoiseSchedule.from_diffusers({"num_train_timesteps": 10})
    with torch.no_grad(), pytest.raises(ValueError, match="sched.T is 10, but the model's UNet2DModel config "
                                                          "declares num_train_timesteps 20"):
        sample(model, other)
    with torch.no_grad():
        assert torch.isfinite(sample(model, NoiseSchedule.from_diffusers({"num_train_timesteps": 20}))).all()
        # a plain function declares no T: nothing to check
        assert torch.isfinite(sample(lambda x, t: model.unet(x, t).sample, other)).all()


def test_export_and_sample_refuse_a_run_whose_model_declares_another_T(learned_20, tmp_path, capsys, monkeypatch):
    """A run written before isofast checked T (the trainer's check switched off to write one) is not exported as
    a pipeline whose scheduler and UNet disagree on T, nor sampled with its schedule."""
    import isofast.train

    monkeypatch.setattr(isofast.train, "check_timesteps", lambda *args, **kwargs: None, raising=False)
    run = tmp_path / "run"
    config = TrainConfig(out_dir=str(run), steps=1, batch_size=4, T=10, ckpt_every=1, progress=False,
                         tensorboard=False)
    trainer = Trainer(DiffusersUNet2D(LEARNED_20), torch.rand(8, 1, 8, 8) * 2 - 1, config)
    trainer.fit()
    trainer.close()
    capsys.readouterr()
    assert main(["export", str(run), "--diffusers", str(tmp_path / "pipe")]) == 2
    err = capsys.readouterr().err
    assert "the run's T is 10, but its UNet2DModel config declares num_train_timesteps 20" in err, err
    assert not (tmp_path / "pipe").exists()
    assert main(["sample", str(run), "--out", str(tmp_path / "s"), "--num", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "sched.T is 10, but the model's UNet2DModel config declares num_train_timesteps 20" in err, err
