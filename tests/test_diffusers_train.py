"""isofast train --model diffusers-unet2d: a diffusers UNet2DModel trained, resumed and sampled by isofast."""
import json

import pytest
import torch

from isofast import checkpoint as ck
from isofast.cli import main

pytest.importorskip("diffusers")
from diffusers_helpers import TINY_UNET2D  # noqa: E402
from trainer_helpers import assert_bitwise  # noqa: E402


@pytest.fixture
def model_config(tmp_path):
    path = tmp_path / "unet2d.json"
    path.write_text(json.dumps(TINY_UNET2D))
    return path


def _train(out, *extra):
    return main(["train", "--data", "digits", "--batch-size", "8", "--T", "20", "--iso-lambda", "0.3",
                 "--log-every", "2", "--ckpt-every", "2", "--no-tensorboard", "--no-progress", "--out", str(out),
                 *extra])


def test_train_resume_and_sample_a_diffusers_unet2d(model_config, tmp_path):
    run = tmp_path / "run"
    assert _train(run, "--model", "diffusers-unet2d", "--model-config", str(model_config), "--steps", "2") == 0
    spec = json.loads((run / "model.json").read_text())
    assert spec["kind"] == "diffusers_unet2d"
    assert {k: spec["config"][k] for k in TINY_UNET2D} == TINY_UNET2D  # the config it was built from, recorded
    first = ck.load_checkpoint(run)
    assert first.ema is not None and all(k.startswith("unet.") for k in first.model)
    # --resume rebuilds the UNet2DModel from the record (no --model-config) and continues as a straight run
    assert main(["train", "--out", str(run), "--resume", "--steps", "4", "--no-progress"]) == 0
    full = tmp_path / "full"
    assert _train(full, "--model", "diffusers-unet2d", "--model-config", str(model_config), "--steps", "4") == 0
    resumed, straight = ck.load_checkpoint(run), ck.load_checkpoint(full)
    assert resumed.meta["step"] == 4
    assert not all(torch.equal(first.model[k], resumed.model[k]) for k in first.model)  # it trained
    assert_bitwise(resumed.model, straight.model, "model")
    assert_bitwise(resumed.ema, straight.ema, "ema")
    # isofast sample rebuilds it from the checkpoint
    samples = tmp_path / "samples"
    assert main(["sample", str(run), "--out", str(samples), "--num", "3", "--sampler", "ddim", "--steps", "4",
                 "--format", "npz", "--no-progress"]) == 0
    import numpy as np

    x = np.load(samples / "samples.npz")["samples"]
    assert x.shape == (3, 1, 8, 8) and np.isfinite(x).all()


def test_resume_refuses_another_model_config(model_config, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(run, "--model", "diffusers-unet2d", "--model-config", str(model_config), "--steps", "1",
                  "--ckpt-every", "1") == 0
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**TINY_UNET2D, "layers_per_block": 2}))
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--steps", "2", "--model-config", str(other)]) == 2
    assert "layers_per_block 2 vs the run's 1" in capsys.readouterr().err


@pytest.mark.parametrize("extra,message", [
    (["--model", "diffusers-unet2d"], "--model diffusers-unet2d needs --model-config"),
    (["--model", "unet", "--model-config", "{cfg}"], "--model-config applies to --model diffusers-unet2d"),
    (["--model", "diffusers-unet2d", "--model-config", "{missing}"], "no such file"),
    (["--model", "diffusers-unet2d", "--model-config", "{cfg3}"], "--data digits has 1 channel"),
    (["--model", "diffusers-unet2d", "--model-config", "{bad}"], "invalid UNet2DModel config"),
    (["--model", "diffusers-unet2d", "--model-config", "{cfg}", "--data", "moons"], "trains on images"),
    (["--model", "diffusers-unet2d", "--model-config", "{cfg}", "--config", "digits8"], "takes its architecture"),
])
def test_train_diffusers_unet2d_bad_input(extra, message, model_config, tmp_path, capsys):
    paths = {"cfg": model_config, "missing": tmp_path / "missing.json", "cfg3": tmp_path / "c3.json",
             "bad": tmp_path / "bad.json"}
    paths["cfg3"].write_text(json.dumps({**TINY_UNET2D, "in_channels": 3, "out_channels": 3}))
    paths["bad"].write_text(json.dumps({**TINY_UNET2D, "block_out_channels": [8]}))  # 2 block types, 1 width
    extra = [e.format(**paths) for e in extra]
    capsys.readouterr()
    assert _train(tmp_path / "run", "--steps", "1", *extra) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
