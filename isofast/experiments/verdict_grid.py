"""One table across protocol studies: lambda's paired effect per protocol (rows) and dataset (columns).

``python -m isofast.experiments.verdict_grid results/verdict`` reads every study folder below the given
directory (each holds ``prdc.csv`` and ``study.json`` as `study.run_study` writes them) and prints three
Markdown tables for one lambda (``--lam``, default 0.3) at temperature 1:

1. at each study's last evaluated step, the paired differences to lambda = 0 of the same seed (precision,
   density, recall, coverage; mean and 95% paired-t interval, marked gain/loss only when the interval
   excludes 0);
2. lambda against a lower temperature: precision at matched recall and density at matched coverage
   against the lambda = 0 models' temperature curve (`study_report.matched_rows`);
3. the effect against training length: the paired differences at 25%, 50% and 100% of the steps each
   study ran (and at any other step it was evaluated), one row per study and dataset.

After them, once: each study's training budget and whether its loss has flattened (the lambda = 0 members'
mean loss over the last 10% of the steps against the 10% before, from ``runs/<dataset>/losses.csv``), for
every study (one run for fewer steps than its budget must show a flattened loss).

The cells are the same numbers each study's own summary.md shows; this only lines them up, so the README's
verdict is read off one generated table instead of being copied by hand from a dozen files.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from .paired import verdict
from .protocols import PROTOCOLS
from .study_report import loss_flatness, matched_rows, paired_rows

__all__ = ["load_study", "grid_markdown", "length_markdown", "budget_markdown", "main"]

_INT_COLUMNS, _STR_COLUMNS = ("seed", "step"), ("dataset", "reference")


def _label(protocol: dict) -> str:
    """A study's row label: its protocol and timestep mode."""
    return f"`{protocol['name']}`, one t per {protocol['timesteps'].removeprefix('per-')}"


def load_study(folder: Path) -> tuple[str, list[dict]]:
    """(row label: protocol and timestep mode, PRDC rows with typed values) of one study folder."""
    label = _label(json.loads((folder / "study.json").read_text())["protocol"])
    with open(folder / "prdc.csv", newline="") as f:
        rows = [{k: (v if k in _STR_COLUMNS else int(v) if k in _INT_COLUMNS else float(v)) for k, v in r.items()}
                for r in csv.DictReader(f)]
    if not rows:
        raise ValueError(f"{folder / 'prdc.csv'} has no rows")
    return label, rows


def _reference(rows: list[dict]) -> str:
    """The reference set a study's cells use: held-out points where it has them, else its first."""
    refs = list(dict.fromkeys(r["reference"] for r in rows))
    return "test" if "test" in refs else refs[0]


def _cell(interval: dict, short: str) -> str:
    if math.isnan(interval["mean"]):
        return f"{short} –"
    mark = {"gain": "▲", "loss": "▼", "n.s.": ""}[verdict(interval)]
    return f"{short} {interval['mean']:+.3f}{mark}"


def _paired_cell(p: dict) -> str:
    return " ".join(_cell(p[m], s) for m, s in (("precision", "P"), ("density", "D"), ("recall", "R"),
                                                 ("coverage", "C")))


def _cells(rows: list[dict], lam: float) -> tuple[dict[str, str], dict[str, str]]:
    """Per dataset: the paired-difference cell and the matched-temperature cell, against `_reference`."""
    ref = _reference(rows)
    rows = [r for r in rows if r["reference"] == ref]
    last = max(r["step"] for r in rows)
    paired, matched = {}, {}
    for p in paired_rows([r for r in rows if r["step"] == last]):
        if p["lambda"] == lam:
            paired[p["dataset"]] = _paired_cell(p) + f" (vs {ref})"
    for m in matched_rows(rows):
        if m["lambda"] == lam:
            parts = []
            for key, short in (("precision@recall", "P@R"), ("density@coverage", "D@C")):
                off, n = m["outside"][key], m[key]["n"]
                # a seed whose lambda model lies outside its temperature curve's range has no matched point
                parts.append(_cell(m[key], short) + (f" ({off}/{n + off} off)" if off else ""))
            matched[m["dataset"]] = " ".join(parts)
    return paired, matched


def grid_markdown(studies: Sequence[tuple[str, list[dict]]], lam: float) -> str:
    """The two tables for ``lam`` over ``studies`` ((label, rows) pairs; several folders may share a label,
    one per dataset)."""
    labels: dict[str, dict[str, tuple[str, str]]] = {}
    for label, rows in studies:
        paired, matched = _cells(rows, lam)
        for d in paired:
            labels.setdefault(label, {})[d] = (paired[d], matched.get(d, "–"))
    datasets = sorted({d for cells in labels.values() for d in cells})
    head = "| protocol | " + " | ".join(datasets) + " |\n|---|" + "---|" * len(datasets) + "\n"
    out = [f"lambda = {lam:g} minus lambda = 0 (same seed), at each study's last step, against held-out points "
           "where the study has them; ▲/▼: the 95% paired-t interval excludes 0.\n\n", head]
    out += [f"| {label} | " + " | ".join(cells.get(d, ("–", "–"))[0] for d in datasets) + " |\n"
            for label, cells in labels.items()]
    out += [f"\nlambda = {lam:g} against the lambda = 0 model at a lower temperature with the same recall (P@R) or "
            "coverage (D@C); (k/n off): k of n seeds' lambda models have a recall (coverage) outside the range "
            "of their temperature curve (below the lowest tau's or above tau = 1's), so the interval is over the "
            "others:\n\n", head]
    out += [f"| {label} | " + " | ".join(cells.get(d, ("–", "–"))[1] for d in datasets) + " |\n"
            for label, cells in labels.items()]
    return "".join(out)


_LENGTHS = (0.25, 0.5, 1.0)


def length_markdown(studies: Sequence[tuple[str, list[dict]]], lam: float) -> str:
    """The effect against training length for ``lam``: per study and dataset, the paired differences at 25%,
    50% and 100% of the steps it ran, and at its other evaluated steps."""
    out = [f"lambda = {lam:g} minus lambda = 0 (same seed) against training length: at 25%, 50% and 100% of the "
           "steps each study ran (its last step), and at its other evaluated steps (step: cell); against held-out "
           "points where the study has them; ▲/▼: the 95% paired-t interval excludes 0; –: not evaluated.\n\n",
           "| protocol | dataset | steps | 25% | 50% | 100% | other steps |\n|---|---|---|---|---|---|---|\n"]
    for label, rows in sorted(studies, key=lambda s: (s[0], s[1][0]["dataset"])):
        ref = _reference(rows)
        by_dataset: dict[str, dict[int, str]] = {}
        for p in paired_rows([r for r in rows if r["reference"] == ref]):
            if p["lambda"] == lam:
                by_dataset.setdefault(p["dataset"], {})[p["step"]] = _paired_cell(p)
        for dataset, cells in by_dataset.items():
            last = max(cells)
            at = [round(f * last) for f in _LENGTHS]
            fixed = [cells.get(step, "–") for step in at]
            other = "; ".join(f"{s:,}: {c}" for s, c in sorted(cells.items()) if s not in at)
            out.append(f"| {label} | {dataset} | {last:,} (vs {ref}) | " + " | ".join(fixed) + f" | {other or '–'} |\n")
    return "".join(out)


def budget_markdown(folders: Sequence[Path]) -> str:
    """The training budget table: per (protocol row, dataset), the steps run of the protocol's budget and the
    lambda = 0 loss's relative change over the last 10% of them."""
    labels: dict[str, dict[str, str]] = {}
    for folder in folders:
        record = json.loads((folder / "study.json").read_text())
        proto = record["protocol"]
        label = _label(proto)
        budget = PROTOCOLS[proto["name"]].steps if proto["name"] in PROTOCOLS else None
        for dataset in record.get("datasets", []):
            losses = folder / "runs" / dataset / "losses.csv"
            flat = loss_flatness(losses, [0.0]) if losses.exists() else []
            change = f"loss {100 * flat[0]['change']:+.1f}%" if flat else "loss –"
            share = f" of {budget:,} ({100 * proto['steps'] / budget:.0f}%)" if budget else ""
            labels.setdefault(label, {})[dataset] = f"{proto['steps']:,}{share}, {change}"
    datasets = sorted({d for cells in labels.values() for d in cells})
    out = ["Training budget: steps run of the protocol's budget, and the lambda = 0 members' mean training loss over "
           "the last 10% of the steps relative to the 10% before (near 0: flattened).\n\n",
           "| protocol | " + " | ".join(datasets) + " |\n|---|" + "---|" * len(datasets) + "\n"]
    out += [f"| {label} | " + " | ".join(cells.get(d, "–") for d in datasets) + " |\n" for label, cells in labels.items()]
    return "".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m isofast.experiments.verdict_grid", description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path, help="a folder whose subfolders are protocol studies (prdc.csv + study.json)")
    ap.add_argument("--lam", type=float, nargs="+", default=[0.3], help="the lambdas to tabulate (default: 0.3)")
    args = ap.parse_args(argv)
    folders = sorted(p.parent for p in args.root.glob("*/study.json")
                     if (p.parent / "prdc.csv").exists() and "protocol" in json.loads(p.read_text()))
    # other studies beside them (e.g. the digits study: no "protocol" in its study.json) have tables of their own
    if not folders:
        print(f"error: no study folders (prdc.csv + study.json) under {args.root}", file=sys.stderr)
        return 2
    studies = [load_study(f) for f in folders]
    print("\n".join([*(grid_markdown(studies, lam) for lam in args.lam),
                     *(length_markdown(studies, lam) for lam in args.lam), budget_markdown(folders)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
