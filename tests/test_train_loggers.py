"""--logger: metrics.csv always; TensorBoard events, a W&B run (offline: no network) or nothing else."""
import csv
import importlib.util
import sys
import time

import pytest
from trainer_helpers import one_thread, tiny_config, tiny_mlp, toy_points  # noqa: F401 (autouse fixture)

from isofast.cli import main as cli_main
from isofast.train import TrainConfig, Trainer
from isofast.train_loggers import SCALARS, LoggerMissingError, require_wandb
from isofast.train_stats import METRIC_FIELDS


def _fit(out, **kw):
    return Trainer(tiny_mlp(), toy_points(), tiny_config(out, steps=4, log_every=2, ckpt_every=4, **kw)).fit()


def test_every_logged_scalar_is_a_metrics_csv_column():
    # one name per quantity: a sink records train/<column>, never a name of its own
    assert set(SCALARS) <= set(METRIC_FIELDS)
    assert {"loss", "mse", "iso_penalty", "isotropy", "skipped_steps"} <= set(SCALARS)


def test_logger_csv_writes_metrics_csv_alone(tmp_path):
    trainer = _fit(tmp_path, logger="csv")
    assert trainer.logger_status == "csv" and trainer.tensorboard_status == "off"
    assert not list(tmp_path.glob("events.out.tfevents.*")) and not (tmp_path / "wandb").exists()
    with open(tmp_path / "metrics.csv", newline="") as f:
        assert [r["step"] for r in csv.DictReader(f)] == ["2", "4"]


def test_logger_tensorboard_writes_events_under_the_csv_names(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = _fit(tmp_path, logger="tensorboard")
    assert trainer.logger_status == "tensorboard on"
    events = EventAccumulator(str(tmp_path)).Reload()
    assert set(events.Tags()["scalars"]) == {f"train/{k}" for k in SCALARS}
    assert [e.step for e in events.Scalars("train/iso_penalty")] == [2, 4]


def test_tensorboard_false_is_the_csv_logger_and_contradictions_are_refused(tmp_path):
    assert TrainConfig(out_dir="x", steps=1, tensorboard=False).logger == "csv"
    assert TrainConfig(out_dir="x", steps=1, tensorboard=True, logger="csv").logger == "tensorboard"
    with pytest.raises(ValueError, match="tensorboard=False contradicts logger='wandb'"):
        TrainConfig(out_dir="x", steps=1, tensorboard=False, logger="wandb")
    with pytest.raises(ValueError, match="TrainConfig.logger must be one of"):
        TrainConfig(out_dir="x", steps=1, logger="mlflow")


def test_wandb_missing_says_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    with pytest.raises(LoggerMissingError, match="pip install wandb"):
        require_wandb()
    with pytest.raises(LoggerMissingError, match="pip install wandb"):
        _fit(tmp_path / "api", logger="wandb")
    assert cli_main(["train", "--data", "swiss_roll", "--n-points", "64", "--batch-size", "8", "--steps", "2",
                     "--logger", "wandb", "--no-progress", "--out", str(tmp_path / "cli")]) == 2
    err = capsys.readouterr().err
    assert "isofast train: error:" in err and "pip install wandb" in err and "Traceback" not in err
    assert not (tmp_path / "cli" / "checkpoints").exists()  # refused before anything trained


def _wandb_record(run_dir, wait_s: float = 60.0) -> bytes:
    """The run's .wandb record file once wandb's service has written past its header: ``run.finish()`` can
    return before the (separate) service process flushes the file on a loaded machine (seen: 7 bytes)."""
    deadline = time.monotonic() + wait_s
    while True:
        record = next(run_dir.glob("run-*.wandb")).read_bytes()
        if all(f"train/{k}".encode() in record for k in SCALARS) and b"iso_lambda" in record:
            return record
        if time.monotonic() > deadline:
            return record
        time.sleep(0.2)


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb not installed (pip install wandb)")
def test_wandb_offline_writes_its_run_under_the_run_folder(tmp_path, monkeypatch):
    for var in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_PROJECT", "WANDB_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):  # nothing written outside the test's folder
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    trainer = _fit(out, logger="wandb")
    assert trainer.logger_status == "wandb on"
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb")), list((out / "wandb").rglob("*"))
    record = _wandb_record(runs[0])  # protobuf records: the names are stored verbatim
    assert all(f"train/{k}".encode() in record for k in SCALARS) and b"iso_lambda" in record  # rows, config
    run_id = (out / "wandb_run_id").read_text().strip()
    assert runs[0].name.endswith(run_id)
    # a resume continues the same W&B run (same id)
    Trainer(tiny_mlp(), toy_points(), tiny_config(out, steps=6, log_every=2, ckpt_every=4, logger="wandb")).fit(resume=True)
    assert (out / "wandb_run_id").read_text().strip() == run_id
    assert all(p.name.endswith(run_id) for p in (out / "wandb").glob("offline-run-*"))
