"""The toy2d sweep's report: the summary and the Markdown table (mean ± std over seeds)."""
import numpy as np
import pytest

from isofast.experiments import toy2d, toy2d_report


def test_markdown_table_shows_mean_and_std_over_seeds():
    cfg = toy2d.SweepConfig(out="x", datasets=("moons",), lambdas=(0.0, 0.1), seeds=(0, 1))
    rng = np.random.default_rng(0)
    results = [toy2d.RunResult("moons", lam, s, *rng.uniform(0, 1, 4), 0, 0, 0, 0, np.zeros((1, 2)))
               for lam in (0.0, 0.1) for s in (0, 1)]
    summary = toy2d_report.summarize(results, cfg)
    prec = [r.precision for r in results if r.iso_lambda == 0.1]
    assert summary[1]["precision_mean"] == pytest.approx(np.mean(prec))
    assert summary[1]["precision_std"] == pytest.approx(np.std(prec, ddof=1))
    md = toy2d_report.markdown_table(cfg, summary)
    assert f"{np.mean(prec):.3f} ± {np.std(prec, ddof=1):.3f}" in md


def test_the_timing_line_says_the_load_it_was_measured_under():
    cfg = toy2d.SweepConfig(out="x", datasets=("moons",), lambdas=(0.0,), seeds=(0,))
    results = [toy2d.RunResult("moons", 0.0, 0, 0.5, 0.5, 0.5, 0.5, 0, 0, 0, 0, np.zeros((1, 2)))]
    summary = toy2d_report.summarize(results, cfg)
    elapsed = {"wall_s": 600.0, "cpu_s": 900.0, "torch_threads": 1, "jobs": 2, "cpu_count": 2, "runs": 1,
               "load_average_at_start": [3.2, 2.0, 1.0], "load_average_at_end": [8.96, 7.0, 6.0]}
    md = toy2d_report.markdown_table(cfg, summary, elapsed)
    assert "1 runs: 10.0 min wall, 15.0 min CPU time (2 job(s) of 1 torch thread(s), 2 CPU cores; load average " \
           "3.2 at start, 9.0 at end)." in md
    del elapsed["load_average_at_start"]  # a sweep timed before the load was recorded: no load claimed
    assert "load" not in toy2d_report.markdown_table(cfg, summary, elapsed)


def test_the_timing_line_of_the_ensemble_engine_says_one_process():
    cfg = toy2d.SweepConfig(out="x", datasets=("moons",), lambdas=(0.0,), seeds=(0,))
    results = [toy2d.RunResult("moons", 0.0, 0, 0.5, 0.5, 0.5, 0.5, 0, 0, 0, 0, np.zeros((1, 2)))]
    elapsed = {"wall_s": 60.0, "cpu_s": 60.0, "torch_threads": 1, "jobs": 1, "engine": "ensemble", "cpu_count": 2,
               "runs": 1}
    md = toy2d_report.markdown_table(cfg, toy2d_report.summarize(results, cfg), elapsed)
    assert "(the ensemble engine: one process of 1 torch thread(s), 2 CPU cores)" in md


def test_a_sweep_records_its_engine_and_one_process_for_the_ensemble(tmp_path):
    cfg = toy2d.config_from_preset(quick=True, out=str(tmp_path / "sweep"), datasets=("moon_scatter",),
                                   lambdas=(0.0,))
    toy2d.run_sweep(cfg, jobs=2, engine="ensemble")
    md = (tmp_path / "sweep" / "results.md").read_text()
    assert "the ensemble engine: one process of" in md and "job(s)" not in md
