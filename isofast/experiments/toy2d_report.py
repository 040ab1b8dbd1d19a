"""The report of a toy2d sweep (`isofast.experiments.toy2d`): its tables and its figures.

* ``results.csv`` / ``results.md``: per (dataset, lambda) the mean and std over seeds of precision,
  recall, density and coverage (`summarize`, `markdown_table`); ``runs.csv``: one row per run;
  ``timing.json``: the sweep's wall and CPU time (`write_tables`);
* ``samples_grid.png``: real vs generated points, a row per dataset, a column per lambda (`plot_samples_grid`);
* ``isotropy_<dataset>.png``: the forward process's isotropy on the training data against theory
  (`plot_isotropy`).
"""
from __future__ import annotations

import csv
import json
import math
from io import StringIO
from pathlib import Path

import numpy as np
import torch

from ..data.toy2d import make_dataset
from ..io import atomic_write_text
from ..plots import save_figure
from ..schedule import NoiseSchedule
from .toy2d import METRICS, REAL_SEED_OFFSET, RunResult, SweepConfig

__all__ = ["markdown_table", "plot_isotropy", "plot_samples_grid", "summarize", "write_tables"]


# ----- tables -------------------------------------------------------------------------------------------
def summarize(results: list[RunResult], cfg: SweepConfig) -> list[dict]:
    """Mean and std (ddof = 1; NaN for one seed) over seeds of each metric, per (dataset, lambda)."""
    rows = []
    for dataset in cfg.datasets:
        for lam in cfg.lambdas:
            group = [r for r in results if r.dataset == dataset and r.iso_lambda == float(lam)]
            row: dict = {"dataset": dataset, "lambda": float(lam), "n_seeds": len(group)}
            for m in METRICS:
                values = np.array([getattr(r, m) for r in group], dtype=np.float64)
                row[f"{m}_mean"] = float(values.mean())
                row[f"{m}_std"] = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
            rows.append(row)
    return rows


def write_tables(out: Path, cfg: SweepConfig, results: list[RunResult], summary: list[dict], elapsed: dict) -> None:
    """results.csv and runs.csv (machine-readable), results.md (mean ± std, best per dataset in bold)."""
    def csv_text(rows: list[dict]) -> str:
        buffer = StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else
                                 (f"{v:.6g}" if isinstance(v, float) else v)) for k, v in row.items()})
        return buffer.getvalue()

    atomic_write_text(out / "results.csv", csv_text(summary))
    atomic_write_text(out / "runs.csv", csv_text([r.row() for r in results]))
    atomic_write_text(out / "results.md", markdown_table(cfg, summary, elapsed))
    atomic_write_text(out / "timing.json", json.dumps(elapsed, indent=1) + "\n")


def _processes_text(elapsed: dict) -> str:
    threads = f"{elapsed['torch_threads']} torch thread(s)"
    if elapsed.get("engine") == "ensemble":
        return f"the ensemble engine: one process of {threads}"
    return f"{elapsed.get('jobs', 1)} job(s) of {threads}"


def _load_text(elapsed: dict) -> str:
    start, end = elapsed.get("load_average_at_start"), elapsed.get("load_average_at_end")
    if not start or not end:
        return ""  # sweeps timed before the load was recorded
    return f"; load average {start[0]:.1f} at start, {end[0]:.1f} at end"


def untimed_work(elapsed: dict) -> str:
    """"; the ensemble resumed at step k of N: ..." when this invocation's time leaves out the training before a
    resumed save (else "")."""
    start, steps = elapsed.get("ensemble_resumed_at_step", 0), elapsed.get("ensemble_steps")
    if not start:
        return ""
    return (f"; the ensemble resumed at step {start:,} of {steps:,}: its training before that is not timed "
            "here")


def markdown_table(cfg: SweepConfig, summary: list[dict], elapsed: dict | None = None) -> str:
    """The results table in Markdown: mean ± std over seeds, the best mean per dataset and metric in bold."""
    epochs = cfg.steps * cfg.batch_size / cfg.n_train
    seeds = ", ".join(str(s) for s in cfg.seeds)
    lines = [
        f"PRDC (k = {cfg.k}) of {cfg.n_eval:,} DDPM samples (EMA weights, T = {cfg.T} {cfg.schedule} schedule) against "
        f"{cfg.n_eval:,} fresh real points. Preset `{cfg.preset}`: TimeMLP, Adam lr {cfg.lr:g}, batch "
        f"{cfg.batch_size}, {cfg.steps:,} steps ({epochs:.0f} epochs of {cfg.n_train:,} points), EMA "
        f"{cfg.ema_decay:g}; seeds {seeds}" + (" (mean ± std over seeds)." if len(cfg.seeds) > 1 else " (one seed)."),
        "",
        "| dataset | λ | precision | recall | density | coverage |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for dataset in cfg.datasets:
        rows = [r for r in summary if r["dataset"] == dataset]
        # best as displayed (3 decimals), so equal-looking values are all bold or none
        best = {m: np.nanmax([round(r[f"{m}_mean"], 3) for r in rows]) if rows else math.nan for m in METRICS}
        for r in rows:
            cells = []
            for m in METRICS:
                mean, std = r[f"{m}_mean"], r[f"{m}_std"]
                text = f"{mean:.3f}" + ("" if math.isnan(std) else f" ± {std:.3f}")
                cells.append(f"**{text}**" if round(mean, 3) == best[m] and len(rows) > 1 else text)
            lam = f"{r['lambda']:g}" + (" (DDPM)" if r["lambda"] == 0 else "")
            lines.append(f"| {dataset} | {lam} | " + " | ".join(cells) + " |")
    if elapsed:
        earlier = elapsed.get("runs_finished_earlier", 0)
        lines += ["", f"{elapsed['runs']} runs: {elapsed['wall_s'] / 60:.1f} min wall, {elapsed['cpu_s'] / 60:.1f} min "
                      f"CPU time ({_processes_text(elapsed)}, "
                      f"{elapsed['cpu_count']} CPU cores{_load_text(elapsed)})"
                      + (f"; {earlier} of them finished in an earlier invocation and are not timed here" if earlier
                         else "") + untimed_work(elapsed) + "."]
    return "\n".join(lines) + "\n"


# ----- figures ------------------------------------------------------------------------------------------
def plot_samples_grid(path: Path, cfg: SweepConfig, results: list[RunResult]) -> Path:
    """Scatter plots: one row per dataset; the fresh real points, then the samples of each lambda (first seed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    seed = cfg.seeds[0]
    size = min(4.0, 1.2 * math.sqrt(10_000 / cfg.n_eval))  # marker area: ink per panel about constant in n
    rows, cols = len(cfg.datasets), len(cfg.lambdas) + 1
    fig = Figure(figsize=(2.0 * cols, 2.1 * rows), dpi=80)
    FigureCanvasAgg(fig)
    for i, dataset in enumerate(cfg.datasets):
        real = make_dataset(dataset, cfg.n_eval, seed=REAL_SEED_OFFSET + seed).numpy()
        panels = [("real", real)]
        for lam in cfg.lambdas:
            r = next(r for r in results if r.dataset == dataset and r.iso_lambda == float(lam) and r.seed == seed)
            label = f"λ={lam:g}" + (" (DDPM)" if lam == 0 else "") + f"\nP {r.precision:.2f} D {r.density:.2f}"
            panels.append((label, r.samples))
        for j, (title, points) in enumerate(panels):
            ax = fig.add_subplot(rows, cols, i * cols + j + 1)
            ax.scatter(points[:, 0], points[:, 1], s=size, alpha=0.5, linewidths=0, color="C1" if j else "C0",
                       rasterized=True)
            ax.set_xlim(-1.4, 1.4)
            ax.set_ylim(-1.4, 1.4)
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(title, fontsize=7)
            if j == 0:
                ax.set_ylabel(dataset, fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    return path


def plot_isotropy(path: Path, cfg: SweepConfig, dataset: str) -> Path:
    """The forward process's measured isotropy on the training data vs 1 + (iso_0 - 1) ab_t."""
    from ..metrics.isotropy import forward_isotropy_curve, plot_isotropy_curve

    sched = NoiseSchedule.from_name(cfg.schedule, cfg.T)
    x0 = make_dataset(dataset, cfg.n_train, seed=cfg.seeds[0])
    measured, theory = forward_isotropy_curve(x0, sched, generator=torch.Generator().manual_seed(0))
    plot_isotropy_curve(measured, theory, np.arange(cfg.T), path,
                        title=f"{dataset}: isotropy of q(x_t | x_0), {cfg.n_train:,} points")
    return path
