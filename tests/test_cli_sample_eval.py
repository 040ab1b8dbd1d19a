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


def test_ddim_samples_of_an_image_model_stay_in_the_data_range(run_dir, tmp_path, capsys):
    # a 2-step run predicts poor noise: unclipped DDIM leaves [-1, 1] far behind (the issue saw -27 to +33)
    def ddim(out, *extra):
        assert main(["sample", str(run_dir), "--out", str(out), "--num", "16", "--sampler", "ddim", "--steps", "10",
                     "--eta", "0", "--format", "npz", "--no-progress", *extra]) == 0
        return np.load(out / "samples.npz")["samples"]

    clipped = ddim(tmp_path / "clipped")
    assert clipped.min() >= -1.0 and clipped.max() <= 1.0
    raw = ddim(tmp_path / "raw", "--no-clip-x0")
    assert np.abs(raw).max() > 1.5
    capsys.readouterr()
    # eval says so when samples leave the data range
    main(["eval", str(tmp_path / "raw" / "samples.npz"), "--metrics", "prdc", "--num-real", "16"])
    err = capsys.readouterr().err
    assert "warning:" in err and "outside [-1, 1]" in err
    main(["eval", str(tmp_path / "clipped" / "samples.npz"), "--metrics", "prdc", "--num-real", "16"])
    assert "warning" not in capsys.readouterr().err


def test_sample_draws_no_bar_when_stderr_is_not_a_terminal(run_dir, tmp_path, capsys):
    assert main(["sample", str(run_dir), "--out", str(tmp_path / "s"), "--num", "2", "--format", "npz"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "it/s" not in err and "isofast sample: 2 samples" in err


def _eval_error(capsys, *args) -> str:
    assert main(["eval", *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("isofast eval: error: ")
    return err


def test_eval_errors_are_one_clear_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ISOFAST_INCEPTION_WEIGHTS", raising=False)
    good = tmp_path / "good.npz"
    np.savez(good, samples=np.zeros((8, 1, 8, 8), dtype=np.float32))
    # no Inception weights: the way out without them is named
    assert "--metrics prdc" in _eval_error(capsys, str(good), "--metrics", "fid")
    # a missing positional file is named as the user knows it, not as an option
    err = _eval_error(capsys, str(tmp_path / "absent.npz"), "--metrics", "prdc")
    assert "samples: no such file" in err and "--samples" not in err
    # a PNG (or any non-.npz) as samples: no numpy talk of pickles
    png = tmp_path / "grid.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    err = _eval_error(capsys, str(png), "--metrics", "prdc")
    assert "not an .npz file" in err and "pickle" not in err
    # an empty .npz, a truncated one, an empty samples array, an object array
    empty = tmp_path / "empty.npz"
    np.savez(empty)
    assert "no 'samples' array" in _eval_error(capsys, str(empty), "--metrics", "prdc")
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:100])
    assert "not a readable .npz" in _eval_error(capsys, str(truncated), "--metrics", "prdc")
    none = tmp_path / "none.npz"
    np.savez(none, samples=np.zeros((0, 1, 8, 8), dtype=np.float32))
    assert "expected (N, ...) with N >= 1" in _eval_error(capsys, str(none), "--metrics", "prdc")
    objects = tmp_path / "objects.npz"
    np.savez(objects, samples=np.array([{"a": 1}], dtype=object))
    assert "not an .npz file of arrays" in _eval_error(capsys, str(objects), "--metrics", "prdc")


class _RunsCode:
    def __reduce__(self):
        return (print, ("code from the weights file ran",))


def test_eval_refuses_junk_and_malicious_inception_weights(tmp_path, capsys):
    good = tmp_path / "good.npz"
    np.savez(good, samples=np.zeros((8, 1, 8, 8), dtype=np.float32))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    err = _eval_error(capsys, str(good), "--metrics", "is", "--inception-weights", str(junk))
    assert "is not a PyTorch weights file" in err
    malicious = tmp_path / "malicious.pth"
    torch.save({"x": _RunsCode()}, malicious)
    err = _eval_error(capsys, str(good), "--metrics", "is", "--inception-weights", str(malicious))
    assert "refused" in err and "weights_only=False" not in err
    assert "code from the weights file ran" not in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_sample_and_eval_on_cuda_without_cuda_say_so(run_dir, tmp_path, capsys):
    assert main(["sample", str(run_dir), "--out", str(tmp_path / "s"), "--num", "2", "--no-progress",
                 "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    np.savez(tmp_path / "fake.npz", samples=np.zeros((8, 1, 8, 8), np.float32))
    assert main(["eval", str(tmp_path / "fake.npz"), "--real", "digits", "--metrics", "prdc", "--k", "2",
                 "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
