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
