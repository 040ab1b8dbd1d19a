"""`isofast sample` and `isofast eval` on a checkpoint of a tiny image run."""
import json

import numpy as np
import pytest
import torch

from isofast.cli import main
from isofast.data.images import make_image_dataset
from isofast.models.unet import build_unet
from isofast.train import TrainConfig, Trainer


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits_run")
    torch.manual_seed(0)
    model = build_unet("digits8", base_channels=8, num_res_blocks=1)
    config = TrainConfig(out_dir=str(out), steps=2, batch_size=8, T=20, ckpt_every=2, log_every=1,
                         progress=False, tensorboard=False, iso_lambda=0.3)
    Trainer(model, make_image_dataset("digits"), config).fit()
    return out


def test_sample_writes_png_and_npz(run_dir, tmp_path):
    out = tmp_path / "samples"
    assert main(["sample", str(run_dir), "--out", str(out), "--num", "6", "--no-progress", "--seed", "3"]) == 0
    samples = np.load(out / "samples.npz")["samples"]
    assert samples.shape == (6, 1, 8, 8) and np.isfinite(samples).all()
    assert (out / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the same seed gives the same samples; DDIM runs too
    again = tmp_path / "again"
    main(["sample", str(run_dir), "--out", str(again), "--num", "6", "--no-progress", "--seed", "3"])
    assert np.array_equal(np.load(again / "samples.npz")["samples"], samples)
    ddim = tmp_path / "ddim"
    assert main(["sample", str(run_dir), "--out", str(ddim), "--num", "4", "--sampler", "ddim", "--steps", "5",
                 "--eta", "0.5", "--format", "npz", "--no-progress"]) == 0
    assert np.load(ddim / "samples.npz")["samples"].shape == (4, 1, 8, 8)


def test_sample_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["sample", str(tmp_path / "nothing"), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "error" in capsys.readouterr().err


def test_sample_refuses_a_model_spec_of_absurd_size_before_allocating(tmp_path, capsys):
    from isofast.checkpoint import save_checkpoint
    from isofast.models.mlp import TimeMLP

    spec = {"kind": "mlp", "config": {"data_dim": 2, "hidden": 10**6, "n_layers": 3, "emb_dim": 128}}
    save_checkpoint(tmp_path / "run" / "checkpoints", 1, TimeMLP(hidden=8).state_dict(),
                    meta={"model_spec": spec, "config": {"T": 10}})
    assert main(["sample", str(tmp_path / "run"), "--out", str(tmp_path / "s"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "parameters" in err and "2^31" in err and "Traceback" not in err


def test_eval_prdc_on_pixels_and_fid_is_with_local_weights(run_dir, tmp_path, capsys):
    from isofast.metrics.inception import FIDInceptionV3

    samples = tmp_path / "s"
    main(["sample", str(run_dir), "--out", str(samples), "--num", "6", "--format", "npz", "--no-progress"])
    weights = tmp_path / "inception.pth"
    torch.save(FIDInceptionV3().state_dict(), weights)  # random weights: tests the plumbing, not the numbers
    report_path = tmp_path / "report.json"
    code = main(["eval", str(samples / "samples.npz"), "--real", "digits", "--num-real", "6",
                 "--inception-weights", str(weights), "--min-fid-samples", "2", "--is-splits", "2",
                 "--batch-size", "12", "--out", str(report_path)])
    assert code == 0
    report = json.loads(report_path.read_text())
    assert report["num_samples"] == 6 and report["num_real"] == 6
    assert set(report["prdc"]) >= {"precision", "recall", "density", "coverage"} and report["prdc"]["k"] == 5
    assert np.isfinite(report["fid"]) and report["inception_score"]["splits"] == 2
    assert "Inception" in report["feature_extractor"]


def test_eval_refuses_small_fid_and_missing_weights(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ISOFAST_INCEPTION_WEIGHTS", raising=False)
    samples = tmp_path / "s"
    main(["sample", str(run_dir), "--out", str(samples), "--num", "6", "--format", "npz", "--no-progress"])
    npz = str(samples / "samples.npz")
    assert main(["eval", npz, "--metrics", "fid"]) == 2
    assert "pt_inception-2015-12-05" in capsys.readouterr().err
    assert main(["eval", npz, "--metrics", "prdc", "--num-real", "5", "--k", "5"]) == 2  # PRDC needs k + 1 points
    assert "error" in capsys.readouterr().err


def test_eval_rejects_nan_samples(tmp_path, capsys):
    path = tmp_path / "bad.npz"
    np.savez(path, samples=np.full((4, 1, 8, 8), np.nan, dtype=np.float32))
    assert main(["eval", str(path), "--metrics", "prdc"]) == 2
    assert "NaN" in capsys.readouterr().err
