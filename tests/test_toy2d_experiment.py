"""`isofast toy2d`: a tiny end-to-end sweep writes every artefact; bad input fails before any training."""
import csv
import io
import json
import sys

import numpy as np
import pytest
import torch

from isofast import cli
from isofast.experiments import toy2d


@pytest.fixture(scope="module")
def quick_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy2d") / "sweep"
    with pytest.MonkeyPatch.context() as mp:
        err = io.StringIO()
        mp.setattr(sys, "stderr", err)
        rc = cli.main(["toy2d", "--quick", "--out", str(out), "--no-progress"])
    return out, rc, err.getvalue()


def test_quick_sweep_writes_every_artefact(quick_sweep):
    out, rc, err = quick_sweep
    assert rc == 0
    assert "smoke test" in err and "say nothing about DDPM vs Iso-Diffusion" in err
    timing = json.loads((out / "timing.json").read_text())
    assert len(timing["load_average_at_start"]) == 3 and len(timing["load_average_at_end"]) == 3
    cfg = toy2d.config_from_preset("default", quick=True, out=str(out))
    for name in ("results.md", "results.csv", "runs.csv", "samples_grid.png", "sweep.json", "timing.json"):
        assert (out / name).stat().st_size > 0, name
    for dataset in cfg.datasets:
        png = (out / f"isotropy_{dataset}.png").read_bytes()
        assert png.startswith(b"\x89PNG")
    assert (out / "samples_grid.png").read_bytes().startswith(b"\x89PNG")

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["dataset"], float(r["lambda"])) for r in rows] == [
        (d, lam) for d in cfg.datasets for lam in cfg.lambdas]
    for r in rows:
        for m in toy2d.METRICS:
            assert 0.0 <= float(r[f"{m}_mean"]) <= (10.0 if m == "density" else 1.0)
            assert r[f"{m}_std"] == ""  # one seed: no std, and none is invented
    md = (out / "results.md").read_text()
    assert md.count("\n| ") == 1 + len(rows)  # header + one line per (dataset, lambda)
    assert "0 (DDPM)" in md

    with open(out / "runs.csv") as f:
        runs = list(csv.DictReader(f))
    assert len(runs) == len(cfg.datasets) * len(cfg.lambdas) * len(cfg.seeds)
    for d in cfg.datasets:
        for lam in cfg.lambdas:
            folder = toy2d.run_dir(cfg, d, lam, cfg.seeds[0])
            samples = np.load(folder / "samples.npy")
            assert samples.shape == (cfg.n_eval, 2) and np.isfinite(samples).all()
            assert (folder / "metrics.csv").exists()
            assert json.loads((folder / "config.json").read_text())["iso_lambda"] == lam
    assert (out / "ensemble_state.pt").exists()  # the default engine's save (the single engine: run checkpoints)


def test_table_metrics_match_prdc_of_saved_samples(quick_sweep):
    """The table reports PRDC of the samples on disk against the documented fresh real set."""
    from isofast.data.toy2d import make_dataset
    from isofast.metrics.prdc import prdc

    out, *_ = quick_sweep
    cfg = toy2d.config_from_preset("default", quick=True, out=str(out))
    with open(out / "runs.csv") as f:
        run = next(csv.DictReader(f))
    folder = toy2d.run_dir(cfg, run["dataset"], float(run["iso_lambda"]), int(run["seed"]))
    real = make_dataset(run["dataset"], cfg.n_eval, seed=toy2d.REAL_SEED_OFFSET + int(run["seed"]))
    got = prdc(real, torch.from_numpy(np.load(folder / "samples.npy")), k=cfg.k)
    for m in toy2d.METRICS:
        assert abs(got[m] - float(run[m])) < 1e-5


def test_resume_reuses_finished_runs_and_refuses_without_flag(quick_sweep, capsys):
    out, *_ = quick_sweep
    before = (out / "runs.csv").read_text()
    assert cli.main(["toy2d", "--quick", "--out", str(out), "--no-progress"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert cli.main(["toy2d", "--quick", "--out", str(out), "--no-progress", "--resume"]) == 0
    err = capsys.readouterr().err
    assert err.count("(finished earlier)") == 4
    assert (out / "runs.csv").read_text() == before


def test_unknown_dataset_is_a_clear_error(tmp_path, capsys):
    rc = cli.main(["toy2d", "--quick", "--datasets", "swiss_roll", "spiral_galaxy", "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "unknown dataset name 'spiral_galaxy'" in err and "swiss_roll" in err
    assert not (tmp_path / "o").exists()  # refused before touching the output folder


def test_unwritable_output_folder_fails_before_training(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    rc = cli.main(["toy2d", "--quick", "--out", str(blocker / "out")])
    assert rc == 2
    assert "not writable" in capsys.readouterr().err


@pytest.mark.parametrize("overrides,match", [
    (dict(lambdas=(-0.1,)), "lambdas"),
    (dict(lambdas=(0.1, 0.1)), "lambdas"),
    (dict(seeds=(-1,)), "seeds"),
    (dict(steps=0), "steps"),
    (dict(n_eval=5), "n_eval"),
    (dict(datasets=()), "datasets"),
])
def test_bad_config_is_refused(tmp_path, overrides, match):
    cfg = toy2d.config_from_preset("default", quick=True, out=str(tmp_path), **overrides)
    with pytest.raises(ValueError, match=match):
        toy2d.prepare_output(cfg, resume=False)


def test_presets():
    paper = toy2d.config_from_preset("paper", out="x")
    assert (paper.batch_size, paper.lr, paper.T, paper.seeds) == (64, 1e-3, 1000, (0, 1, 2))
    assert paper.steps * paper.batch_size == 1000 * 10_000  # 1000 epochs of the 10k dataset
    default = toy2d.config_from_preset(out="x", steps=7)
    assert default.datasets == toy2d.PAPER_DATASETS and default.lambdas == toy2d.DEFAULT_LAMBDAS
    assert default.steps == 7 and default.n_eval == 10_000
    with pytest.raises(ValueError, match="preset"):
        toy2d.config_from_preset("fast", out="x")


def test_quick_schedule_reaches_noise_in_its_T_steps():
    # --quick trains with T = 50: the T = 1000 linear betas stop at ab_T ~ 0.6 (isotropy of x_T 0.58)
    from isofast import NoiseSchedule
    from isofast.data.toy2d import make_dataset
    from isofast.metrics.isotropy import forward_isotropy_curve

    cfg = toy2d.config_from_preset("default", quick=True, out="x")
    x0 = make_dataset("swiss_roll", cfg.n_train, seed=0)
    sched = NoiseSchedule.from_name(cfg.schedule, cfg.T)
    measured, _ = forward_isotropy_curve(x0, sched, timesteps=[cfg.T - 1], generator=torch.Generator().manual_seed(0))
    assert measured[-1] >= 0.95
    assert toy2d.config_from_preset("default", out="x").schedule == "linear"  # the real presets are unchanged
    with pytest.raises(ValueError, match="schedule"):
        toy2d.config_from_preset("default", quick=True, out="x", schedule="sigmoid").validate()


def test_resume_refuses_other_training_settings(tmp_path):
    """A resumed sweep must train what its sweep.json recorded; a record from before a setting existed
    counts as that setting's old value (schedule: linear)."""
    cfg = toy2d.config_from_preset("default", quick=True, out=str(tmp_path))
    record = {k: getattr(cfg, k) for k in ("steps", "batch_size", "lr", "T", "schedule", "n_train", "n_eval", "k",
                                           "ema_decay")}
    (tmp_path / "sweep.json").write_text(json.dumps(record))
    assert toy2d.prepare_output(cfg, resume=True) == tmp_path
    (tmp_path / "sweep.json").write_text(json.dumps({**record, "steps": cfg.steps + 1, "lr": 0.5}))
    with pytest.raises(ValueError, match=r"sweep.json has other values of steps, lr$"):
        toy2d.prepare_output(cfg, resume=True)
    linear = toy2d.config_from_preset("default", quick=True, out=str(tmp_path), schedule="linear")
    old_record = {k: v for k, v in record.items() if k != "schedule"}
    (tmp_path / "sweep.json").write_text(json.dumps({**old_record, "T": linear.T}))
    assert toy2d.prepare_output(linear, resume=True) == tmp_path
    with pytest.raises(ValueError, match="schedule"):
        toy2d.prepare_output(cfg, resume=True)  # cosine against the old record's linear
