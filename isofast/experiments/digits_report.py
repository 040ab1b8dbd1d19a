"""The report of the digits study (`digits_study.run_study`): summary.md and the frontier figures.

summary.md, per reference set: the lambda table (tau = 1; mean ± std over seeds of PRDC and the samples'
mean squared norm), the paired difference lambda − 0 of the same seed with its 95% paired-t interval
(`paired.paired_interval`), the temperature baseline (lambda = 0 at each tau), lambda against a lower
temperature (precision and density at matched recall, density at matched coverage: `matched_intervals`), the tau
whose recall / coverage matches each lambda's (interpolated per seed along the lambda = 0 curve), and a
plain reading of the numbers. Figures: ``frontier_<reference>.png`` (`study_report.plot_frontier`) and
``mse.png`` (the training MSE per lambda).
"""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from ..io import atomic_write_text
from .paired import matched_difference, paired_interval, verdict
from .study_report import _fmt_interval, _mean_std, paired_rows, plot_frontier

__all__ = ["matching_tau", "write_report"]

METRICS = ("precision", "recall", "density", "coverage")
COLUMNS = (*METRICS, "sample_sq_norm")


def matching_tau(value: float, taus: list[float], curve: list[float]) -> float:
    """The temperature at which the lambda = 0 curve (``curve[i]`` at ``taus[i]``) reaches ``value``, by
    linear interpolation between neighbouring taus; NaN when ``value`` lies outside the curve's range."""
    order = np.argsort(curve)
    xs, ys = np.asarray(curve, dtype=np.float64)[order], np.asarray(taus, dtype=np.float64)[order]
    if math.isnan(value) or value < xs[0] or value > xs[-1]:
        return math.nan
    return float(np.interp(value, xs, ys))


def _fmt_norm(interval: dict) -> str:
    """A paired interval of the mean squared norm: "larger"/"smaller", not gain/loss (a norm is no score)."""
    return _fmt_interval(interval).replace("**gain**", "larger").replace("**loss**", "smaller")


def _cell(rows: list[dict], ref: str, lam: float, tau: float) -> dict[int, dict]:
    return {r["seed"]: r for r in rows if (r["reference"], r["lambda"], r["temperature"]) == (ref, lam, tau)}


def _tau_rows(rows: list[dict], ref: str, lambdas: list[float], taus: list[float]) -> list[str]:
    """Per lambda > 0: the seeds' matching taus for recall and coverage."""
    lines = []
    for lam in lambdas:
        cell, parts = _cell(rows, ref, lam, 1.0), []
        for m in ("recall", "coverage"):
            found = []
            for seed, r in sorted(cell.items()):
                curve = [_cell(rows, ref, 0.0, t).get(seed, {}).get(m, math.nan) for t in taus]
                found.append(matching_tau(r[m], taus, curve))
            shown = ", ".join("outside" if math.isnan(t) else f"{t:.3f}" for t in found)
            inside = [t for t in found if not math.isnan(t)]
            mean = f"mean {np.mean(inside):.3f}" if inside else "no seed inside the curve"
            parts.append(f"{m}: {mean} (per seed {shown})")
        lines.append(f"| {lam:g} | " + " | ".join(parts) + " |")
    return lines


MATCHED = (("recall", "precision"), ("recall", "density"), ("coverage", "density"))


def matched_intervals(rows: list[dict], ref: str, lam: float, taus: list[float]) -> dict[str, dict]:
    """{"<y>@<x>": paired interval, plus "outside": seeds off the curve} for each (x, y) of `MATCHED`: per seed,
    the lambda model's y minus the lambda = 0 model's y interpolated along its temperature curve at the same x
    (`paired.matched_difference`)."""
    out: dict = {"outside": {}}
    cell = _cell(rows, ref, lam, 1.0)
    for x, y in MATCHED:
        diffs = []
        for seed, r in sorted(cell.items()):
            curve = [c for c in (_cell(rows, ref, 0.0, t).get(seed) for t in taus) if c is not None]
            diffs.append(matched_difference(r[x], r[y], [c[x] for c in curve], [c[y] for c in curve]))
        out[f"{y}@{x}"] = paired_interval(diffs)
        out["outside"][f"{y}@{x}"] = sum(math.isnan(d) for d in diffs)
    return out


def _reading(rows: list[dict], ref: str, lambdas: list[float], taus: list[float]) -> list[str]:
    """Plain sentences from the intervals: which metrics gained or lost, and against matched temperature."""
    lines = []
    paired = {pr["lambda"]: pr for pr in paired_rows(rows) if pr["reference"] == ref}
    for lam in lambdas:
        if lam not in paired:
            continue
        words = {m: verdict(paired[lam][m]) for m in METRICS}
        gains = [m for m in METRICS if words[m] == "gain"]
        losses = [m for m in METRICS if words[m] == "loss"]
        text = (f"- lambda {lam:g} vs 0 (tau 1): gains in {', '.join(gains) or 'nothing'}; losses in "
                f"{', '.join(losses) or 'nothing'}; the rest not significant.")
        if len(taus) > 1:
            mv = matched_intervals(rows, ref, lam, taus)
            keys = [f"{y}@{x}" for x, y in MATCHED]
            said = [f"{key.replace('@', ' at matched ')} {_fmt_interval(mv[key])}"
                    + (f" ({mv['outside'][key]} seed(s) outside the curve, left out)" if mv["outside"][key] else "")
                    for key in keys]
            text += " Against the lambda = 0 model at the temperature of the same recall / coverage: " + "; ".join(
                said) + "."
            better = [k.replace("@", " at matched ") for k in keys if verdict(mv[k]) == "gain"]
            worse = [k.replace("@", " at matched ") for k in keys if verdict(mv[k]) == "loss"]
            if not better and not worse:
                text += " On these numbers the penalty is not distinguishable from a lower temperature."
            else:
                text += (f" So the penalty does more than a lower temperature in {', '.join(better) or 'nothing'}, and "
                         f"less in {', '.join(worse) or 'nothing'}.")
        lines.append(text)
    return lines


def _minutes(timing: dict, kind: str) -> str:
    return f"{(timing[f'arms_train_{kind}_s'] + timing[f'arms_sample_{kind}_s']) / 60:.1f}"


def _markdown(cfg, rows: list[dict], timing: dict) -> str:
    lambdas = sorted(cfg.lambdas)
    taus = sorted({r["temperature"] for r in rows}, reverse=True)
    lines = ["# Digits (8x8, scikit-learn): DDPM vs Iso-Diffusion vs a lower temperature, paired over seeds", "",
             f"Settings: {timing['n_train']} training digits, {timing['n_reference']} held out (split seed "
             f"{cfg.split_seed}); UNet base {cfg.base_channels} channels, levels {list(cfg.channel_mult)}, "
             f"{cfg.num_res_blocks} ResBlock(s) per level, no attention; {cfg.steps} steps of batch {cfg.batch_size}, "
             f"Adam lr {cfg.lr:g}, grad clip {cfg.grad_clip:g}, EMA {cfg.ema_decay:g} (samples from the EMA weights), "
             f"fused loss iso_mode batch; {cfg.schedule} schedule, T = {cfg.T}; DDPM ancestral sampling "
             f"({'x0 clamped to [-1, 1] at every step' if cfg.clip_x0 else 'x0 not clamped'}), "
             f"{cfg.n_samples} samples per arm and tau; PRDC k = {cfg.k} on the 64 pixels against "
             f"{timing['n_reference']} reference digits per set; seeds {list(cfg.seeds)}.", "",
             f"Time: all arms together {_minutes(timing, 'wall')} min wall, {_minutes(timing, 'cpu')} min CPU "
             f"(training + sampling, summed over the arms' result.json); the last invocation "
             f"{timing['wall_s'] / 60:.1f} min wall, {timing['cpu_s'] / 60:.1f} min CPU "
             f"({timing['torch_threads']} torch thread(s)); its load average at start "
             f"{', '.join(f'{v:.2f}' for v in timing['loadavg_start'])}, at end "
             f"{', '.join(f'{v:.2f}' for v in timing['loadavg_end'])}.", "",
             f"Mean squared norm of the training digits (64 pixels in [-1, 1]): {timing['train_sq_norm']:.2f}.", "",
             "Intervals: 95% paired-t over seeds (difference to lambda = 0 of the same seed; the arms of a seed share "
             "initial weights, data order, training noise and sampler noise); **gain**/**loss** only when the "
             "interval excludes 0.", ""]
    for ref in cfg.references:
        sel = [r for r in rows if r["reference"] == ref]
        lines += [f"## Reference `{ref}`" + (" (held-out digits)" if ref == "test" else " (training digits)"), "",
                  "### lambda at tau = 1", "", "| lambda | " + " | ".join(COLUMNS) + " |", "|---" * 6 + "|"]
        for lam in lambdas:
            cell = _cell(sel, ref, lam, 1.0)
            lines.append(f"| {lam:g} | " + " | ".join(_mean_std([r[m] for r in cell.values()]) for m in COLUMNS) + " |")
        lines += ["", "Paired difference to lambda = 0:", "", "| lambda | " + " | ".join(COLUMNS) + " |",
                  "|---" * 6 + "|"]
        base = _cell(sel, ref, 0.0, 1.0)
        for pr in paired_rows(sel):
            cur = _cell(sel, ref, pr["lambda"], 1.0)
            norm = paired_interval([cur[s]["sample_sq_norm"] - base[s]["sample_sq_norm"] for s in cur if s in base])
            lines.append(f"| {pr['lambda']:g} | " + " | ".join(_fmt_interval(pr[m]) for m in METRICS)
                         + f" | {_fmt_norm(norm)} |")
        if len(taus) > 1:
            lines += ["", "### Temperature baseline (lambda = 0)", "", "| tau | " + " | ".join(COLUMNS) + " |",
                      "|---" * 6 + "|"]
            for tau in taus:
                cell = _cell(sel, ref, 0.0, tau)
                lines.append(f"| {tau:g} | " + " | ".join(_mean_std([r[m] for r in cell.values()]) for m in COLUMNS)
                             + " |")
            lines += ["", "### lambda vs a lower temperature (matched recall / coverage, paired over seeds)", "",
                      "The lambda model's metric minus the lambda = 0 model's (same seed) on its temperature curve at "
                      "the same recall (or coverage). Where coverage barely moves with tau, matching on it is "
                      "ill-conditioned; recall is the axis that tau trades.", "",
                      "| lambda | " + " | ".join(f"{y} at matched {x}" for x, y in MATCHED) + " |", "|---" * 4 + "|"]
            for lam in [lam for lam in lambdas if lam > 0]:
                mv = matched_intervals(sel, ref, lam, taus)
                cells = [_fmt_interval(mv[f"{y}@{x}"]) + (f" ({mv['outside'][f'{y}@{x}']} seeds outside the curve)"
                                                          if mv["outside"][f"{y}@{x}"] else "") for x, y in MATCHED]
                lines.append(f"| {lam:g} | " + " | ".join(cells) + " |")
            lines += ["", "The temperature of lambda = 0 whose recall / coverage equals each lambda's (tau = 1):", "",
                      "| lambda | tau matching recall / coverage |", "|---|---|"]
            lines += _tau_rows(sel, ref, [lam for lam in lambdas if lam > 0], taus)
        lines += ["", "### What the numbers show", ""] + _reading(sel, ref, lambdas, taus) + [""]
    return "\n".join(lines) + "\n"


def plot_mse(path: Path, out: Path, cfg) -> None:
    """The training MSE (the DDPM term, without the penalty) against steps, mean over seeds per lambda, from
    each arm's metrics.csv: has training flattened?"""
    import csv

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ..plots import save_figure
    from .digits_study import arm_folder

    fig = Figure(figsize=(5.2, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for lam in sorted(cfg.lambdas):
        curves = []
        for seed in cfg.seeds:
            with open(arm_folder(out, float(lam), seed) / "train" / "metrics.csv") as f:
                curves.append([(int(r["step"]), float(r["mse"])) for r in csv.DictReader(f)])
        n = min(len(c) for c in curves)
        steps = [s for s, _ in curves[0][:n]]
        ax.plot(steps, np.mean([[v for _, v in c[:n]] for c in curves], axis=0), label=f"λ = {lam:g}")
    ax.set_xlabel("training steps")
    ax.set_ylabel("MSE of eps (mean over 50 steps and seeds)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def write_report(out: Path, cfg, rows: list[dict], timing: dict) -> None:
    """summary.md, ``frontier_<reference>.png`` of every reference set and ``mse.png``."""
    atomic_write_text(out / "summary.md", _markdown(cfg, rows, timing))
    # plot_frontier reads lambdas, seeds and a title name from its config: the digits study's, by those names
    view = SimpleNamespace(lambdas=cfg.lambdas, seeds=cfg.seeds, protocol=SimpleNamespace(name="digits UNet"))
    for ref in cfg.references:
        plot_frontier(out / f"frontier_{ref}.png", view, rows, "digits", ref)
    plot_mse(out / "mse.png", out, cfg)
