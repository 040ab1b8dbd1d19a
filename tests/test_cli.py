"""`isofast` errors a user can fix: one line on stderr, exit status 2, no traceback; --debug shows it (issue 14)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from isofast.cli import main


def _train(tmp_path, *extra: str) -> list[str]:
    return ["train", "--data", "moons", "--out", str(tmp_path / "run"), "--steps", "1", "--batch-size", "8",
            "--no-progress", "--no-tensorboard", *extra]


BAD_OPTIONS = {
    "lr": (["--lr", "nan"], "lr must be finite"),
    "ema-decay": (["--ema-decay", "1.5"], "ema_decay must be finite and in"),
    "backend": (["--backend", "bogus"], "backend must be one of"),
    # raised by Trainer(...) after the config is built (was a traceback)
    "batch-size": (["--batch-size", "100000"], "exceeds the dataset size"),
    "override": (["--override", "lr"], "--override applies to --resume only"),
}
if not torch.cuda.is_available():
    BAD_OPTIONS["device"] = (["--device", "cuda"], "CUDA is not available")


@pytest.mark.parametrize("option", sorted(BAD_OPTIONS))
def test_bad_option_values_give_one_line_and_status_2(tmp_path, capsys, option):
    args, message = BAD_OPTIONS[option]
    assert main(_train(tmp_path, *args)) == 2
    err = capsys.readouterr().err
    assert err.startswith("isofast train: error: ") and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_debug_shows_the_traceback_wherever_it_is(tmp_path):
    with pytest.raises(ValueError, match="backend must be one of"):
        main(["--debug", *_train(tmp_path, "--backend", "bogus")])
    with pytest.raises(ValueError, match="backend must be one of"):
        main([*_train(tmp_path, "--backend", "bogus"), "--debug"])
    # errors `isofast train` used to catch and print itself: --debug shows them too
    with pytest.raises(ValueError, match="applies to --resume only"):
        main([*_train(tmp_path, "--override", "lr"), "--debug"])
    with pytest.raises(ValueError, match="--num must be >= 1"):
        main(["sample", str(tmp_path / "run"), "--out", str(tmp_path / "s"), "--num", "0", "--debug"])
    with pytest.raises((ValueError, OSError)):  # no such run: a CheckpointError (ValueError) or FileNotFoundError
        main(["export", str(tmp_path / "nothing"), "--diffusers", str(tmp_path / "p"), "--debug"])
    with pytest.raises(ValueError, match="--threads must be >= 1"):
        main(["toy2d", "--threads", "0", "--out", str(tmp_path / "t"), "--debug"])
    with pytest.raises(OSError):  # no such samples file
        main(["eval", str(tmp_path / "none.npz"), "--metrics", "prdc", "--debug"])


def test_unavailable_backend_is_a_user_error(tmp_path, capsys, monkeypatch):
    from isofast.ops import backends

    monkeypatch.setattr(backends, "status", lambda name: (name == "reference", "not built in this test"))
    assert main(_train(tmp_path, "--backend", "cpu")) == 2
    assert "backend 'cpu' is not available" in capsys.readouterr().err


def test_a_bug_still_shows_its_traceback(monkeypatch):
    """Only errors of the input are shortened: anything else propagates (status 1 with a traceback)."""
    import argparse

    import isofast.cli as cli

    parser = argparse.ArgumentParser(prog="isofast")
    parser.add_subparsers(dest="command").add_parser("boom").set_defaults(func=lambda args: 1 / 0)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    with pytest.raises(ZeroDivisionError):
        cli.main(["boom"])


def test_exit_status_and_stderr_of_the_real_command(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "isofast.cli", *_train(tmp_path, "--ema-decay", "1.5")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "ema_decay" in proc.stderr


def test_python_dash_m_isofast_is_the_command(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "isofast", *_train(tmp_path, "--ema-decay", "1.5")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "ema_decay" in proc.stderr and "Traceback" not in proc.stderr
