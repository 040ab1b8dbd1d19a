"""Paired statistics over seeds: lambda's effect measured against lambda = 0 of the same seed.

Members of one seed share data, initial weights, training noise and sampler noise, so the difference of
a metric between lambda and 0 *of the same seed* removes most of the seed-to-seed spread. Intervals are
paired-t intervals (Student t with n - 1 degrees of freedom on the n per-seed differences); a difference
is called a gain or a loss only when its interval excludes 0.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats

__all__ = ["matched_difference", "paired_interval", "verdict"]


def paired_interval(diffs: Sequence[float], level: float = 0.95) -> dict[str, float]:
    """mean, std (ddof 1), the paired-t interval [lo, hi] at ``level`` and n of per-seed differences
    (NaN entries dropped; lo = hi = NaN with fewer than 2 differences)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    d = np.asarray([x for x in diffs if not math.isnan(x)], dtype=np.float64)
    n = d.size
    mean = float(d.mean()) if n else math.nan
    if n < 2:
        return {"mean": mean, "std": math.nan, "lo": math.nan, "hi": math.nan, "n": n}
    std = float(d.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "lo": mean - half, "hi": mean + half, "n": n}


def verdict(interval: dict[str, float]) -> str:
    """"gain" when the interval lies above 0, "loss" below, "n.s." when it holds 0 (or is undefined)."""
    if interval["lo"] > 0:
        return "gain"
    if interval["hi"] < 0:
        return "loss"
    return "n.s."


def matched_difference(x: float, y: float, curve_x: Sequence[float], curve_y: Sequence[float]) -> float:
    """y minus the baseline curve's y at the same x (linear interpolation along the curve's points sorted
    by x); NaN when x lies outside the curve's range. E.g. x = recall, y = precision of a lambda > 0
    model, the curve = the lambda = 0 model's (recall, precision) over temperatures: the precision gained
    over simply sampling the plain model at the temperature that gives the same recall."""
    cx, cy = np.asarray(curve_x, dtype=np.float64), np.asarray(curve_y, dtype=np.float64)
    order = np.argsort(cx)
    cx, cy = cx[order], cy[order]
    if cx.size == 0 or math.isnan(x) or x < cx[0] or x > cx[-1]:
        return math.nan
    return float(y - np.interp(x, cx, cy))


def paired_table(rows: list[dict], metrics: Sequence[str] = ("precision", "recall", "density", "coverage"),
                 lambda_key: str = "lambda") -> list[dict]:
    """Per (dataset, lambda > 0): each metric's paired interval against lambda = 0 of the same seed, from rows
    with keys dataset, seed, ``lambda_key`` and the metrics (e.g. a classic sweep's runs.csv)."""
    by = {(r["dataset"], float(r[lambda_key]), int(r["seed"])): r for r in rows}
    out = []
    for d, lam in sorted({(d, lam) for d, lam, _ in by if lam > 0}):
        seeds = sorted(s for dd, ll, s in by if (dd, ll) == (d, lam) and (d, 0.0, s) in by)
        out.append({"dataset": d, "lambda": lam, "seeds": seeds,
                    **{m: paired_interval([float(by[(d, lam, s)][m]) - float(by[(d, 0.0, s)][m]) for s in seeds])
                       for m in metrics}})
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m isofast.experiments.paired RUNS_CSV``: paired intervals of a classic sweep's runs.csv."""
    import argparse
    import csv

    parser = argparse.ArgumentParser(prog="python -m isofast.experiments.paired", description=main.__doc__)
    parser.add_argument("runs_csv", help="runs.csv of an `isofast toy2d` sweep (columns dataset, iso_lambda, seed, "
                                         "precision, recall, density, coverage)")
    args = parser.parse_args(argv)
    with open(args.runs_csv) as f:
        rows = list(csv.DictReader(f))
    metrics = ("precision", "recall", "density", "coverage")
    print("| dataset | lambda | seeds | " + " | ".join(metrics) + " |\n|---|---|---|" + "---|" * len(metrics))
    for r in paired_table(rows, metrics, lambda_key="iso_lambda"):
        cells = [f"{r[m]['mean']:+.4f} [{r[m]['lo']:+.4f}, {r[m]['hi']:+.4f}] {verdict(r[m])}" for m in metrics]
        print(f"| {r['dataset']} | {r['lambda']:g} | {len(r['seeds'])} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
