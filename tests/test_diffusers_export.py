"""isofast export RUN --diffusers OUT: a DDPMPipeline that diffusers loads and runs; other models refused;
without diffusers, the commands say what to install."""
import json
import sys

import pytest
import torch

from isofast import checkpoint as ck
from isofast.cli import main

diffusers = pytest.importorskip("diffusers")
from diffusers_helpers import TINY_UNET2D  # noqa: E402


@pytest.fixture(scope="module")
def unet2d_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("unet2d_run")
    (root / "cfg.json").write_text(json.dumps(TINY_UNET2D))
    assert main(["train", "--data", "digits", "--model", "diffusers-unet2d", "--model-config", str(root / "cfg.json"),
                 "--batch-size", "8", "--T", "20", "--schedule", "cosine", "--steps", "2", "--ckpt-every", "2",
                 "--no-tensorboard", "--no-progress", "--out", str(root / "run")]) == 0
    return root / "run"


def test_export_writes_a_ddpm_pipeline_diffusers_loads_and_runs(unet2d_run, tmp_path):
    out = tmp_path / "pipe"
    assert main(["export", str(unet2d_run), "--diffusers", str(out)]) == 0
    pipe = diffusers.DDPMPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    # the run's EMA weights, unchanged
    ema = ck.load_checkpoint(unet2d_run).ema
    exported = pipe.unet.state_dict()
    assert sorted(exported) == sorted(k.removeprefix("unet.") for k in ema)
    assert all(torch.equal(exported[k.removeprefix("unet.")], v) for k, v in ema.items())
    # the run's schedule (cosine, T = 20)
    from isofast import NoiseSchedule

    assert pipe.scheduler.config.num_train_timesteps == 20
    assert pipe.scheduler.config.beta_schedule == "squaredcos_cap_v2" and pipe.scheduler.config.clip_sample is False
    torch.testing.assert_close(pipe.scheduler.alphas_cumprod, NoiseSchedule.cosine(20).alphas_cumprod, rtol=0, atol=2e-6)
    images = pipe(batch_size=2, num_inference_steps=2, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 8, 8, 1) and (images >= 0).all() and (images <= 1).all()


def test_export_refuses_isofast_models_and_used_folders(unet2d_run, tmp_path, capsys):
    mlp_run = tmp_path / "mlp"
    assert main(["train", "--data", "swiss_roll", "--n-points", "64", "--batch-size", "8", "--T", "20", "--steps", "1",
                 "--mlp-hidden", "16", "--ckpt-every", "1", "--no-tensorboard", "--no-progress",
                 "--out", str(mlp_run)]) == 0
    capsys.readouterr()
    assert main(["export", str(mlp_run), "--diffusers", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "cannot export a mlp model" in err and "--model diffusers-unet2d" in err and "Traceback" not in err
    assert not (tmp_path / "p").exists()
    used = tmp_path / "used"
    used.mkdir()
    (used / "x").write_text("")
    assert main(["export", str(unet2d_run), "--diffusers", str(used)]) == 2
    assert "not an empty folder" in capsys.readouterr().err


def test_without_diffusers_the_commands_say_what_to_install(unet2d_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers now raises ImportError
    (tmp_path / "cfg.json").write_text(json.dumps(TINY_UNET2D))
    commands = [
        ["export", str(unet2d_run), "--diffusers", str(tmp_path / "p")],
        ["train", "--data", "digits", "--model", "diffusers-unet2d", "--model-config", str(tmp_path / "cfg.json"),
         "--steps", "1", "--no-progress", "--no-tensorboard", "--out", str(tmp_path / "run")],
        ["sample", str(unet2d_run), "--out", str(tmp_path / "s"), "--num", "1", "--no-progress"],
    ]
    for argv in commands:
        capsys.readouterr()
        assert main(argv) == 2, argv[0]
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and 'pip install "isofast[diffusers]"' in err, (argv[0], err)
