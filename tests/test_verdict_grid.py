"""`python -m isofast.experiments.verdict_grid`: one table across protocol study folders."""
import csv
import json

import pytest

from isofast.experiments import verdict_grid
from isofast.experiments.study import PRDC_COLUMNS

BASE = {"precision": 0.80, "recall": 0.99, "density": 0.70, "coverage": 0.95}


def _study(folder, name, timesteps, rows):
    folder.mkdir()
    (folder / "study.json").write_text(json.dumps({"protocol": {"name": name, "timesteps": timesteps}}))
    with open(folder / "prdc.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=PRDC_COLUMNS)
        w.writeheader()
        w.writerows(rows)


def _row(dataset, lam, tau, seed, **metrics):
    return {"dataset": dataset, "lambda": lam, "temperature": tau, "seed": seed, "step": 100, "fraction": 1.0,
            "reference": "test", **{**BASE, **metrics}}


def _rows(dataset, d_precision):
    """3 seeds; lambda 0.3 raises precision by d_precision (+-0.001 by seed) and leaves the rest; the
    lambda = 0 temperature curve: tau 0.8 has recall 0.97 and precision 0.90."""
    rows = []
    for seed, jitter in enumerate((-0.001, 0.0, 0.001)):
        rows.append(_row(dataset, 0.0, 1.0, seed))
        rows.append(_row(dataset, 0.0, 0.8, seed, precision=0.90, recall=0.97))
        rows.append(_row(dataset, 0.3, 1.0, seed, precision=0.80 + d_precision + jitter, recall=0.98))
    return rows


def test_grid_lines_up_paired_differences_and_matched_temperature(tmp_path, capsys):
    _study(tmp_path / "a", "authors2024", "per-batch", _rows("moons", 0.05))
    _study(tmp_path / "b", "authors2024", "per-sample", _rows("moons", 0.0))
    assert verdict_grid.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    batch = next(line for line in out.splitlines() if line.startswith("| `authors2024`, one t per batch"))
    sample = next(line for line in out.splitlines() if line.startswith("| `authors2024`, one t per sample"))
    assert "P +0.050▲" in batch and "R -0.010▼" in batch  # recall 0.98 vs 0.99 in every seed
    assert "P +0.000 " in sample and "▲" not in sample.split("|")[2]
    # at recall 0.98 the temperature curve (0.99, 0.80)-(0.97, 0.90) gives precision 0.85: 0.85 - 0.85 = 0
    matched = [line for line in out.splitlines() if line.startswith("| `authors2024`, one t per batch")][1]
    assert "P@R +0.000" in matched


def test_other_studies_beside_them_are_left_out(tmp_path, capsys):
    _study(tmp_path / "a", "authors2024", "per-batch", _rows("moons", 0.05))
    (tmp_path / "digits").mkdir()
    (tmp_path / "digits" / "study.json").write_text(json.dumps({"config": {}}))
    (tmp_path / "digits" / "prdc.csv").write_text("dataset\n")
    assert verdict_grid.main([str(tmp_path)]) == 0
    assert "one t per batch" in capsys.readouterr().out


def test_empty_root_is_a_clear_error(tmp_path, capsys):
    assert verdict_grid.main([str(tmp_path)]) == 2
    assert "no study folders" in capsys.readouterr().err


def test_study_without_rows_is_refused(tmp_path):
    _study(tmp_path / "a", "isofast", "per-sample", [])
    with pytest.raises(ValueError, match="no rows"):
        verdict_grid.load_study(tmp_path / "a")


def test_budget_table_names_steps_run_and_the_loss_change(tmp_path, capsys):
    _study(tmp_path / "a", "authors2025", "per-sample", _rows("moons", 0.0))
    record = {"protocol": {"name": "authors2025", "timesteps": "per-sample", "steps": 25_000}, "datasets": ["moons"]}
    (tmp_path / "a" / "study.json").write_text(json.dumps(record))
    (tmp_path / "a" / "runs" / "moons").mkdir(parents=True)
    # lambda 0: loss 0.20 over steps 8,000-9,000 (the 80-90% window of 10,000), 0.19 over 9,000-10,000: -5%
    lines = ["step,lambda_0_seed_0,lambda_0.3_seed_0"] + [f"{s},{0.20 if s <= 9000 else 0.19},1.0"
                                                          for s in range(500, 10_001, 500)]
    (tmp_path / "a" / "runs" / "moons" / "losses.csv").write_text("\n".join(lines) + "\n")
    assert verdict_grid.main([str(tmp_path)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines()
               if line.startswith("| `authors2025`") and "of 100,000" in line)
    assert "25,000 of 100,000 (25%), loss -5.0%" in row


def test_length_table_puts_each_step_in_its_fraction_of_the_steps_run(tmp_path, capsys):
    rows = []
    for step, gain in ((25, 0.0), (30, 0.01), (50, 0.02), (100, 0.05)):  # 30: an evaluation at another length
        rows += [{**r, "step": step, "fraction": step / 100} for r in _rows("moons", gain)]
    _study(tmp_path / "a", "isofast", "per-sample", rows)
    assert verdict_grid.main([str(tmp_path)]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines()
                if line.startswith("| `isofast`, one t per sample | moons |"))
    cells = [c.strip() for c in line.split("|")[1:-1]]
    assert cells[2] == "100 (vs test)"
    assert cells[3].startswith("P +0.000 ") and cells[4].startswith("P +0.020▲") and cells[5].startswith("P +0.050▲")
    assert cells[6].startswith("30: P +0.010▲")
