"""TrainStats: window means become one metrics.csv row; a resumed run drops the rows past its checkpoint."""
import pytest
import torch

from isofast.reference import LossParts
from isofast.train_stats import METRIC_FIELDS, TrainStats


def _add(stats, loss, iso=0.5):
    t = torch.tensor
    stats.add(t(loss), LossParts(t(loss), t(iso), t(2.0)), t(1.0))


def test_a_window_becomes_one_row_of_its_means(tmp_path):
    stats = TrainStats(tmp_path, torch.device("cpu"), batch_size=4, is_main=True)
    stats.open(-1, logger="csv")
    assert stats.log(0, 0.1) is None  # an empty window writes nothing
    _add(stats, 1.0)
    _add(stats, 3.0)
    row = stats.log(2, 0.1)
    assert (row["step"], row["loss"], row["mse"], row["iso_penalty"], row["isotropy"], row["lr"]) == (2, "2", "2", "0.5", "2", "0.1")
    assert stats.steps == 0 and stats.tensorboard_status == "off"
    stats.close()
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[0] == ",".join(METRIC_FIELDS) and lines[1].startswith("2,2,2,0.5,2,1,0.1,")


def test_resume_keeps_the_rows_up_to_the_checkpoint_window_and_its_sums(tmp_path):
    stats = TrainStats(tmp_path, torch.device("cpu"), batch_size=4, is_main=True)
    stats.open(-1, logger="csv")
    for step in range(1, 7):
        _add(stats, float(step))
        if step == 3:  # a checkpoint (copies: the sums grow in place)
            saved = {"sums": {k: v.clone() for k, v in stats.state_dict()["sums"].items()}, "steps": stats.steps}
        if step % 2 == 0:
            stats.log(step, 0.1)
    stats.close()
    resumed = TrainStats(tmp_path, torch.device("cpu"), batch_size=4, is_main=True)
    resumed.load_state_dict(saved)  # step 3's unlogged window
    resumed.open(3, logger="csv")
    assert resumed.steps == 1
    _add(resumed, 4.0)
    assert resumed.log(4, 0.1)["loss"] == "3.5"
    resumed.close()
    assert [line.split(",")[0] for line in (tmp_path / "metrics.csv").read_text().splitlines()] == ["step", "2", "4"]


def test_a_non_finite_loss_names_the_steps(tmp_path):
    stats = TrainStats(tmp_path, torch.device("cpu"), batch_size=4, is_main=False)
    stats.open(-1, logger="csv")
    _add(stats, float("nan"))
    with pytest.raises(FloatingPointError, match="between steps 5 and 5"):
        stats.log(5, 0.1)


def test_one_name_per_quantity_and_old_runs_resume_under_the_new_names(tmp_path):
    # "iso" meant the isotropy in the bar and the penalty in metrics.csv: now iso_penalty and isotropy
    assert "iso" not in METRIC_FIELDS and {"iso_penalty", "isotropy"} <= set(METRIC_FIELDS)
    (tmp_path / "metrics.csv").write_text("step,loss,mse,iso,isotropy\n2,1,1,0.25,1.5\n4,1,1,0.5,1.5\n")
    stats = TrainStats(tmp_path, torch.device("cpu"), batch_size=4, is_main=True)
    stats.load_state_dict({"sums": {"iso": torch.tensor(0.75)}, "steps": 1})  # a window saved under the old name
    stats.open(3, logger="csv")
    _add(stats, 1.0, iso=0.25)
    row = stats.log(4, 0.1)
    stats.close()
    assert row["iso_penalty"] == "0.5"  # (0.75 + 0.25) / 2
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[0] == ",".join(METRIC_FIELDS) and lines[1].split(",")[3] == "0.25"


def test_skipped_steps_count_but_add_nothing_and_a_window_of_them_is_no_crash(tmp_path):
    stats = TrainStats(tmp_path, torch.device("cpu"), batch_size=4, is_main=True)
    stats.open(-1, logger="csv")
    t = torch.tensor
    stats.add(t(float("inf")), LossParts(t(float("inf")), t(0.5), t(2.0)), t(float("nan")), skipped=True)
    stats.add(t(float("inf")), LossParts(t(float("inf")), t(0.5), t(2.0)), t(float("nan")), skipped=True)
    row = stats.log(2, 0.1)  # fp16 finding its scale: no loss to report, and no FloatingPointError
    assert (row["loss"], row["mse"], row["skipped_steps"]) == ("", "", "2")
    stats.add(t(float("inf")), LossParts(t(float("inf")), t(0.5), t(2.0)), t(float("nan")), skipped=True)
    _add(stats, 3.0)
    row = stats.log(4, 0.1)  # the mean is over the step taken
    assert (row["loss"], row["skipped_steps"]) == ("3", "1")
    stats.close()
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[1].startswith("2,,,,,,0.1,") and lines[1].endswith(",2") and lines[2].endswith(",1")
