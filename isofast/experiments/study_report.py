"""The report of a protocol study (`study.run_study`): summary.md with paired intervals, and figures.

summary.md, per dataset and reference set:
  1. lambda sweep at the full training length (tau = 1): mean +- std over seeds, and for every lambda > 0
     the paired difference to lambda = 0 of the same seed with its 95% paired-t interval;
  2. the temperature baseline: the lambda = 0 models sampled at each tau;
  3. lambda against temperature: precision at matched recall and density at matched coverage, i.e. the
     lambda model's metric minus the lambda = 0 model's (same seed) interpolated along its temperature
     curve at the same recall / coverage (`paired.matched_difference`);
  4. the effect against training length: the paired differences at every evaluated step;
  5. has the loss flattened: each lambda's mean training loss over the last 10% of the steps and its
     relative change from the 10% before (a study run for fewer steps than its protocol's budget must show
     that its loss has flattened).
Figures: ``frontier_<dataset>.png`` (precision-recall and density-coverage: the lambda sweep and the
temperature curve), ``length_<dataset>.png`` (paired differences vs training steps), ``loss_<dataset>.png``
(training loss per lambda: has it flattened?).
"""
from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..io import atomic_write_text
from ..plots import save_figure
from .paired import matched_difference, paired_interval, verdict
from .toy2d import METRICS

__all__ = ["write_report"]



def _index(rows: list[dict]) -> dict:
    """(dataset, reference, step, lambda, tau) -> {seed: row}."""
    table: dict = defaultdict(dict)
    for r in rows:
        table[(r["dataset"], r["reference"], r["step"], r["lambda"], r["temperature"])][r["seed"]] = r
    return table


def _mean_std(values: list[float]) -> str:
    v = np.asarray(values, dtype=np.float64)
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if v.size > 1 else f"{v.mean():.3f}"


def _fmt_interval(iv: dict) -> str:
    if math.isnan(iv["lo"]):
        return f"{iv['mean']:+.3f}" if not math.isnan(iv["mean"]) else "–"
    mark = {"gain": " **gain**", "loss": " **loss**", "n.s.": ""}[verdict(iv)]
    return f"{iv['mean']:+.3f} [{iv['lo']:+.3f}, {iv['hi']:+.3f}]{mark}"


def paired_rows(rows: list[dict]) -> list[dict]:
    """Per (dataset, reference, step, lambda > 0): each metric's paired interval against lambda = 0 (tau 1)."""
    table, out = _index(rows), []
    keys = sorted({(d, ref, s, lam) for d, ref, s, lam, tau in table if tau == 1.0 and lam > 0})
    for d, ref, step, lam in keys:
        cur, base = table[(d, ref, step, lam, 1.0)], table.get((d, ref, step, 0.0, 1.0), {})
        seeds = sorted(set(cur) & set(base))
        out.append({"dataset": d, "reference": ref, "step": step, "lambda": lam,
                    **{m: paired_interval([cur[s][m] - base[s][m] for s in seeds]) for m in METRICS}})
    return out


def matched_rows(rows: list[dict]) -> list[dict]:
    """Per (dataset, reference, lambda > 0) at the last step: precision at matched recall and density at
    matched coverage against the lambda = 0 temperature curve of the same seed."""
    table, out = _index(rows), []
    last = max(r["step"] for r in rows)
    taus = sorted({r["temperature"] for r in rows})
    for d, ref, step, lam, tau in sorted(table):
        if step != last or tau != 1.0 or lam == 0:
            continue
        diffs: dict[str, list[float]] = {"precision@recall": [], "density@coverage": []}
        for seed, r in table[(d, ref, step, lam, 1.0)].items():
            curve = [table.get((d, ref, step, 0.0, t), {}).get(seed) for t in taus]
            curve = [c for c in curve if c is not None]
            diffs["precision@recall"].append(matched_difference(
                r["recall"], r["precision"], [c["recall"] for c in curve], [c["precision"] for c in curve]))
            diffs["density@coverage"].append(matched_difference(
                r["coverage"], r["density"], [c["coverage"] for c in curve], [c["density"] for c in curve]))
        out.append({"dataset": d, "reference": ref, "lambda": lam,
                    **{k: paired_interval(v) for k, v in diffs.items()},
                    "outside": {k: sum(math.isnan(x) for x in v) for k, v in diffs.items()}})
    return out


def _wall_text(wall_s: float | list) -> str:
    """The study's wall time from its invocations' (None: one not timed), the last being this one."""
    times = list(wall_s) if isinstance(wall_s, (list, tuple)) else [wall_s]
    if len(times) == 1:
        return f"wall time of this invocation {times[0] / 60:.1f} min"
    timed = [t for t in times if t is not None]
    untimed = len(times) - len(timed)
    return (f"wall time {sum(timed) / 60:.1f} min over {len(times)} invocations (this one {times[-1] / 60:.1f} min"
            + (f"; {untimed} earlier one(s) not timed" if untimed else "") + ")")


def _markdown(out: Path, cfg, rows: list[dict], wall_s: float | list) -> str:
    p, table = cfg.protocol, _index(rows)
    last = max(r["step"] for r in rows)
    lines = [f"# Protocol `{p.name}`: lambda sweep, temperature baseline, paired over seeds", "",
             f"Settings: {p.n_points} points ({p.n_train} for training), data noise "
             f"{'default' if p.data_noise is None else p.data_noise}, model `{p.model}`, batch {p.batch_size}, "
             f"{p.steps} steps, Adam lr {p.lr:g}, EMA {p.ema_decay:g}, grad clip {p.grad_clip:g}, timesteps "
             f"{p.timesteps}, T = {p.T}, {p.n_eval} samples, PRDC k = {p.k}; seeds {list(cfg.seeds)}; "
             f"{_wall_text(wall_s)}.", "",
             "Intervals: 95% paired-t over seeds (difference to lambda = 0 of the same seed); **gain**/**loss** "
             "only when the interval excludes 0.", ""]
    paired = paired_rows(rows)
    for d in cfg.datasets:
        for ref in p.references:
            lines += [f"## {d}, reference `{ref}`", "", f"### lambda sweep at step {last} (tau = 1)", "",
                      "| lambda | " + " | ".join(METRICS) + " |", "|---" * 5 + "|"]
            for lam in sorted(cfg.lambdas):
                cell = table.get((d, ref, last, float(lam), 1.0), {})
                lines.append(f"| {lam:g} | " + " | ".join(_mean_std([r[m] for r in cell.values()]) for m in METRICS)
                             + " |")
            lines += ["", "Paired difference to lambda = 0:", "", "| lambda | " + " | ".join(METRICS) + " |",
                      "|---" * 5 + "|"]
            for pr in paired:
                if (pr["dataset"], pr["reference"], pr["step"]) == (d, ref, last):
                    lines.append(f"| {pr['lambda']:g} | " + " | ".join(_fmt_interval(pr[m]) for m in METRICS) + " |")
            taus = sorted({r["temperature"] for r in rows if r["dataset"] == d}, reverse=True)
            if len(taus) > 1:
                lines += ["", "### Temperature baseline (lambda = 0)", "", "| tau | " + " | ".join(METRICS) + " |",
                          "|---" * 5 + "|"]
                for tau in taus:
                    cell = table.get((d, ref, last, 0.0, tau), {})
                    lines.append(f"| {tau:g} | " + " | ".join(_mean_std([r[m] for r in cell.values()])
                                                             for m in METRICS) + " |")
                lines += ["", "### lambda vs a lower temperature (matched recall / coverage)", "",
                          "| lambda | precision at matched recall | density at matched coverage |", "|---|---|---|"]
                for mr in matched_rows([r for r in rows if r["dataset"] == d and r["reference"] == ref]):
                    cells = []
                    for key in ("precision@recall", "density@coverage"):
                        outside = mr["outside"][key]
                        cells.append(_fmt_interval(mr[key]) + (f" ({outside} seeds outside the curve)" if outside
                                                                else ""))
                    lines.append(f"| {mr['lambda']:g} | {cells[0]} | {cells[1]} |")
            steps = sorted({pr["step"] for pr in paired if pr["dataset"] == d})
            if len(steps) > 1:
                lines += ["", "### Effect against training length (paired difference to lambda = 0)", "",
                          "| step | lambda | " + " | ".join(METRICS) + " |", "|---" * 6 + "|"]
                for pr in paired:
                    if pr["dataset"] == d and pr["reference"] == ref:
                        lines.append(f"| {pr['step']} | {pr['lambda']:g} | "
                                     + " | ".join(_fmt_interval(pr[m]) for m in METRICS) + " |")
            lines.append("")
        lines += _loss_section(out / "runs" / d / "losses.csv", cfg.lambdas)
    return "\n".join(lines) + "\n"


def _read_losses(losses_csv: Path) -> tuple[list[str], np.ndarray]:
    with open(losses_csv) as f:
        data = list(csv.reader(f))
    return data[0], np.array(data[1:], dtype=np.float64).reshape(len(data) - 1, len(data[0]))


def loss_flatness(losses_csv: Path, lambdas) -> list[dict]:
    """Per lambda: the seeds' mean logged loss over the last 10% of the steps (``last``), over the 10% before
    (``before``), and the relative change last / before - 1."""
    return _flatness(*_read_losses(losses_csv), lambdas)


def _flatness(header: list[str], body: np.ndarray, lambdas) -> list[dict]:
    if body.shape[0] == 0:
        return []
    steps, end = body[:, 0], body[-1, 0]
    last, before = steps > 0.9 * end, (steps > 0.8 * end) & (steps <= 0.9 * end)
    out = []
    for lam in sorted(lambdas):
        cols = [i for i, h in enumerate(header) if h.startswith(f"lambda_{lam:g}_seed_")]
        mean = body[:, cols].mean(axis=1)
        a, b = float(mean[last].mean()), float(mean[before].mean()) if before.any() else math.nan
        out.append({"lambda": float(lam), "last": a, "before": b, "change": a / b - 1.0})
    return out


def _loss_section(losses_csv: Path, lambdas) -> list[str]:
    if not losses_csv.exists():
        return []
    header, body = _read_losses(losses_csv)
    flat = _flatness(header, body, lambdas)
    if not flat:
        return []
    end = int(body[-1, 0])
    lines = [f"### Training loss: has it flattened? (mean over seeds; steps {0.8 * end:.0f}–{0.9 * end:.0f} and "
             f"{0.9 * end:.0f}–{end})", "", "| lambda | loss, 80–90% | loss, 90–100% | relative change |",
             "|---|---|---|---|"]
    for r in flat:
        lines.append(f"| {r['lambda']:g} | {r['before']:.4f} | {r['last']:.4f} | {100 * r['change']:+.1f}% |")
    return lines + [""]


def _figure(ncols: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2 * ncols, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols)


def plot_frontier(path: Path, cfg, rows: list[dict], dataset: str, reference: str) -> None:
    """Precision-recall and density-coverage: each lambda (seed mean, std bars) and the lambda = 0 model's
    temperature curve."""
    table, last = _index(rows), max(r["step"] for r in rows)
    fig, axes = _figure(2)
    taus = sorted({r["temperature"] for r in rows if r["dataset"] == dataset}, reverse=True)
    for ax, (mx, my) in zip(axes, (("recall", "precision"), ("coverage", "density")), strict=True):
        pts = [table.get((dataset, reference, last, 0.0, t), {}) for t in taus]
        xs = [np.mean([r[mx] for r in c.values()]) for c in pts]
        ys = [np.mean([r[my] for r in c.values()]) for c in pts]
        ax.plot(xs, ys, "-o", color="0.4", label="λ = 0 at temperature τ")
        for x, y, t in zip(xs, ys, taus, strict=True):
            ax.annotate(f"τ={t:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color="0.3")
        for lam in sorted(cfg.lambdas):
            c = table.get((dataset, reference, last, float(lam), 1.0), {})
            vx, vy = [r[mx] for r in c.values()], [r[my] for r in c.values()]
            ax.errorbar(np.mean(vx), np.mean(vy), xerr=np.std(vx, ddof=1) if len(vx) > 1 else None,
                        yerr=np.std(vy, ddof=1) if len(vy) > 1 else None, fmt="s", capsize=3, label=f"λ = {lam:g}")
        ax.set_xlabel(mx)
        ax.set_ylabel(my)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{cfg.protocol.name}: {dataset}, reference {reference}, step {last}, {len(cfg.seeds)} seeds")
    save_figure(fig, path)


def plot_length(path: Path, cfg, rows: list[dict], dataset: str, reference: str) -> None:
    """The paired difference to lambda = 0 (mean, 95% interval) of each metric against training steps."""
    paired = [p for p in paired_rows(rows) if p["dataset"] == dataset and p["reference"] == reference]
    fig, axes = _figure(4)
    for ax, m in zip(axes, METRICS, strict=True):
        for lam in sorted({p["lambda"] for p in paired}):
            sel = sorted((p for p in paired if p["lambda"] == lam), key=lambda p: p["step"])
            steps = [p["step"] for p in sel]
            mean = np.array([p[m]["mean"] for p in sel])
            lo, hi = np.array([p[m]["lo"] for p in sel]), np.array([p[m]["hi"] for p in sel])
            ax.errorbar(steps, mean, yerr=[mean - lo, hi - mean], fmt="-o", capsize=3, label=f"λ = {lam:g}")
        ax.axhline(0, color="0.5", lw=0.8)
        ax.set_title(f"Δ {m} vs λ = 0")
        ax.set_xlabel("training steps")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    save_figure(fig, path)


def plot_losses(path: Path, losses_csv: Path, cfg) -> None:
    """Training loss (mean over seeds, per logging window) per lambda."""
    header, body = _read_losses(losses_csv)
    if body.size == 0:
        return
    fig, axes = _figure(1)
    for lam in sorted(cfg.lambdas):
        cols = [i for i, h in enumerate(header) if h.startswith(f"lambda_{lam:g}_seed_")]
        axes.plot(body[:, 0], body[:, cols].mean(axis=1), label=f"λ = {lam:g}")
    axes.set_xlabel("training steps")
    axes.set_ylabel("loss (mean over the logging window and seeds)")
    axes.set_yscale("log")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    save_figure(fig, path)


def write_report(out: Path, cfg, rows: list[dict], wall_s: float | list) -> None:
    """summary.md and the figures; wall_s: this invocation's wall time, or every invocation's (the last this one's,
    None for one not timed)."""
    atomic_write_text(out / "summary.md", _markdown(out, cfg, rows, wall_s))
    for d in cfg.datasets:
        ref = cfg.protocol.references[0]
        plot_frontier(out / f"frontier_{d}.png", cfg, rows, d, ref)
        if len(cfg.eval_steps()) > 1:
            plot_length(out / f"length_{d}.png", cfg, rows, d, ref)
        losses = out / "runs" / d / "losses.csv"
        if losses.exists():
            plot_losses(out / f"loss_{d}.png", losses, cfg)
