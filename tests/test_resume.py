"""Resume can neither lose a run nor change it silently: which checkpoint, which config changes, what is kept."""
import hashlib
import json
import shutil

import pytest
from trainer_helpers import assert_bitwise, one_thread, tiny_config, tiny_mlp, toy_points  # noqa: F401 (autouse fixture)

from isofast import checkpoint as ck
from isofast.cli import main as cli_main
from isofast.resume import ResumeError
from isofast.train import Trainer


def _train(out, steps, model_seed=0, resume=False, override=(), **kw):
    return Trainer(tiny_mlp(model_seed), toy_points(), tiny_config(out, steps=steps, **kw)).fit(
        resume=resume, override=override)


def _names(root):
    return sorted(p.name for p in root.iterdir())


# ----- which checkpoint ---------------------------------------------------------------------------------
@pytest.mark.parametrize("latest", ["missing", "dangling"])
def test_missing_latest_resumes_from_the_newest_complete_checkpoint(tmp_path, capsys, latest):
    run = tmp_path / "run"
    _train(run, 10)
    if latest == "missing":
        (run / "checkpoints" / "latest").unlink()
    else:
        (run / "checkpoints" / "latest").write_text("step_0000020\n")  # a checkpoint moved away by hand
    # another initialisation: only a resume from step 10 can give the uninterrupted run's weights
    resumed = _train(run, 15, model_seed=99, resume=True)
    err = capsys.readouterr().err
    assert ("latest is missing" if latest == "missing" else "step_0000020, which does not exist") in err
    assert "resuming from the newest complete checkpoint" in err and "step_0000010" in err
    full = _train(tmp_path / "full", 15)
    assert_bitwise(full.model.state_dict(), resumed.model.state_dict(), "model")


def test_missing_latest_and_a_damaged_newest_refuses_and_deletes_nothing(tmp_path):
    _train(tmp_path, 10)
    root = tmp_path / "checkpoints"
    (root / "latest").unlink()
    bad = root / "step_0000010" / "model.safetensors"
    bad.write_bytes(bad.read_bytes()[:-8])
    before = _names(root)
    with pytest.raises(ck.CheckpointError, match=r"step_0000010.*truncated.*step_0000005"):
        _train(tmp_path, 15, resume=True)
    assert _names(root) == before == ["step_0000005", "step_0000010"]


def test_damaged_latest_hint_lists_only_verified_checkpoints_and_how_to_resume(tmp_path):
    _train(tmp_path, 10)
    good = tmp_path / "checkpoints" / "step_0000005"
    bad = tmp_path / "checkpoints" / "step_0000010" / "ema.safetensors"
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(ck.CheckpointError) as info:
        _train(tmp_path, 20, resume=True)
    message = str(info.value)
    assert message.count("step_0000010") == 1, message  # named once, as the damaged file; not offered as good
    assert f"--resume {good}" in message and f"resume={good}" in message


def test_resuming_an_older_checkpoint_sets_the_newer_ones_aside_instead_of_overwriting_them(tmp_path, capsys):
    _train(tmp_path, 10)
    root = tmp_path / "checkpoints"
    bad = root / "step_0000010" / "ema.safetensors"
    bad.write_bytes(bad.read_bytes()[:100])
    damaged = {p.name: p.read_bytes() for p in (root / "step_0000010").iterdir()}
    resumed = _train(tmp_path, 12, resume=root / "step_0000005")
    assert resumed.step == 12 and "set aside" in capsys.readouterr().err
    kept = root / "set_aside" / "step_0000010"
    assert {p.name: p.read_bytes() for p in kept.iterdir()} == damaged
    assert [p.name for p in ck.list_checkpoints(root)] == ["step_0000010", "step_0000012"]


def test_resuming_another_runs_checkpoint_into_a_folder_with_checkpoints_is_refused(tmp_path):
    _train(tmp_path / "a", 5)
    _train(tmp_path / "b", 5)
    before = _names(tmp_path / "b" / "checkpoints")
    with pytest.raises(ResumeError, match=r"already holds checkpoints"):
        _train(tmp_path / "b", 10, resume=tmp_path / "a")
    assert _names(tmp_path / "b" / "checkpoints") == before


# ----- which changes -----------------------------------------------------------------------------------
def test_a_changed_run_setting_is_refused_with_every_difference_and_config_json_kept(tmp_path):
    _train(tmp_path, 5, iso_lambda=0.3)
    config_json = (tmp_path / "config.json").read_bytes()
    with pytest.raises(ResumeError) as info:
        _train(tmp_path, 10, resume=True, iso_lambda=0.5, lr=0.5, seed=3)
    message = str(info.value)
    for change in ("iso_lambda: 0.3 -> 0.5", "lr: 0.01 -> 0.5", "seed: 0 -> 3", "--override"):
        assert change in message, message
    assert (tmp_path / "config.json").read_bytes() == config_json
    assert not (tmp_path / "history.jsonl").exists()


def test_steps_and_intervals_may_change_freely(tmp_path):
    _train(tmp_path, 5)
    resumed = _train(tmp_path, 12, resume=True, log_every=3, ckpt_every=4, keep_checkpoints=3)
    assert resumed.step == 12 and not (tmp_path / "history.jsonl").exists()
    assert json.loads((tmp_path / "config.json").read_text())["log_every"] == 3


def test_override_changes_a_setting_and_records_it_in_the_history(tmp_path):
    _train(tmp_path, 5)
    resumed = _train(tmp_path, 8, resume=True, override=["lr"], lr=0.5)
    assert resumed.optimizer.param_groups[0]["lr"] == 0.5
    assert json.loads((tmp_path / "config.json").read_text())["lr"] == 0.5
    (entry,) = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert (entry["step"], entry["key"], entry["old"], entry["new"]) == (5, "lr", 0.01, 0.5)
    assert entry["time"].endswith("Z")
    # the new value is now the run's: resuming again with it needs no override
    assert _train(tmp_path, 10, resume=True, lr=0.5).step == 10


def test_override_of_an_unknown_or_free_key_is_refused(tmp_path):
    _train(tmp_path, 5)
    with pytest.raises(ValueError, match=r"override.*'learning_rate'.*lr"):
        _train(tmp_path, 8, resume=True, override=["learning_rate"])
    with pytest.raises(ValueError, match=r"'steps' may change on resume without an override"):
        _train(tmp_path, 8, resume=True, override=["steps"])


def test_resume_at_or_past_the_asked_steps_says_nothing_was_trained(tmp_path, capsys):
    _train(tmp_path, 10)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    trainer = _train(tmp_path, 10, resume=True)
    assert trainer.step == 10 and trainer.steps_trained == 0
    assert "nothing trained" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


# ----- the command line ---------------------------------------------------------------------------------
def _cli(out, *extra):
    return cli_main(["train", "--data", "swiss_roll", "--n-points", "64", "--batch-size", "8", "--T", "20",
                     "--mlp-hidden", "16", "--log-every", "2", "--ckpt-every", "2", "--no-tensorboard",
                     "--no-progress", "--out", str(out), *extra])


def test_cli_resume_keeps_the_recorded_settings_and_refuses_changes(tmp_path, capsys):
    run = tmp_path / "run"
    assert _cli(run, "--steps", "2", "--iso-lambda", "0.3", "--lr", "0.01") == 0
    # no setting repeated: the run's own (iso-lambda 0.3, lr 0.01, 64 points, hidden 16) are used
    assert cli_main(["train", "--out", str(run), "--resume", "--steps", "4", "--no-progress"]) == 0
    assert _cli(tmp_path / "full", "--steps", "4", "--iso-lambda", "0.3", "--lr", "0.01") == 0
    assert_bitwise(ck.load_checkpoint(run).model, ck.load_checkpoint(tmp_path / "full").model, "model")
    capsys.readouterr()
    assert cli_main(["train", "--out", str(run), "--resume", "--steps", "6", "--iso-lambda", "0.5",
                     "--data", "moons"]) == 2
    err = capsys.readouterr().err
    assert "iso_lambda: 0.3 -> 0.5" in err and "data:" in err and "--override" in err and "Traceback" not in err
    assert cli_main(["train", "--out", str(run), "--resume", "--steps", "6", "--iso-lambda", "0.5",
                     "--override", "iso-lambda", "--no-progress"]) == 0
    assert json.loads((run / "config.json").read_text())["iso_lambda"] == 0.5
    capsys.readouterr()
    assert cli_main(["train", "--out", str(run), "--resume", "--steps", "8", "--mlp-hidden", "32"]) == 2
    assert "--mlp-hidden 32 differs from the run's hidden 16" in capsys.readouterr().err


def test_cli_resume_rebuilds_the_recorded_model_and_refuses_another_config(tmp_path, capsys):
    run = tmp_path / "digits"
    base = ["train", "--data", "digits", "--batch-size", "4", "--T", "10", "--log-every", "1", "--ckpt-every", "1",
            "--no-tensorboard", "--no-progress", "--out", str(run)]
    assert cli_main([*base[:3], "--config", "tiny", *base[3:], "--steps", "1"]) == 0
    assert cli_main(["train", "--out", str(run), "--resume", "--steps", "2", "--no-progress"]) == 0
    assert ck.load_checkpoint(run).step == 2
    capsys.readouterr()
    assert cli_main(["train", "--out", str(run), "--resume", "--steps", "3", "--config", "digits8"]) == 2
    err = capsys.readouterr().err
    assert "--config digits8" in err and "Traceback" not in err
    assert cli_main(["train", "--out", str(run), "--resume", "--steps", "3", "--model", "mlp"]) == 2
    assert "--model mlp" in capsys.readouterr().err
    assert cli_main(["train", "--out", str(run), "--resume", "--steps", "2"]) == 0
    assert "nothing trained" in capsys.readouterr().err


# ----- byte-identical files ------------------------------------------------------------------------------
def test_equal_runs_write_byte_identical_checkpoints(tmp_path):
    # the same run folder each time: state.json records it, so only there can every file agree
    run = tmp_path / "run"
    found = []
    for _ in range(4):
        _train(run, 5)
        found.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                      for p in (run / "checkpoints" / "step_0000005").iterdir()})
        shutil.rmtree(run)
    assert len(found[0]) == 4 and all(d == found[0] for d in found), found
