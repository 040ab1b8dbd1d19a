"""Figures derived from the timings, and the three outputs: the stdout table, the JSON file, the PNG chart.

Derived per variant: speed-up over the row's eager baseline and over its fastest ``torch.compile``
baseline (ratios of medians, same run), achieved bandwidth for the row's minimum bytes
(``bytes_floor / median``) and its fraction of the copy bandwidth measured at start, items/s,
and, where the row has a target, pass/miss of each required figure.
"""
from __future__ import annotations

import json
import math
import os

from _rows import Row, Variant


def derive(rows: list[Row], copy_bytes_per_s: float | None) -> None:
    for row in rows:
        # The reference of each ratio: the eager baseline, and the fastest torch.compile baseline.
        by_role: dict[str, Variant] = {}
        for v in row.variants:
            if v.status == "ok" and v.role in ("eager", "compile"):
                best = by_role.get(v.role)
                if best is None or v.timing.median < best.timing.median:
                    by_role[v.role] = v
        for v in row.variants:
            if v.status != "ok" or v.timing is None:
                continue
            d = v.derived
            med = v.timing.median
            for role in ("eager", "compile"):
                base = by_role.get(role)
                d[f"x_{role}"] = base.timing.median / med if base is not None else None
            if row.bytes_floor:
                d["floor_bytes_per_s"] = row.bytes_floor / med
                d["copy_fraction"] = row.bytes_floor / med / copy_bytes_per_s if copy_bytes_per_s else None
            if row.items:
                d["items_per_s"] = row.items / med
            if row.flops and row.flop_rate:
                d["matmul_fraction"] = row.flops / med / row.flop_rate
            if row.target is not None and row.target.applies(v):
                d["target"] = _target_marks(row, v)


def _target_marks(row: Row, v: Variant) -> dict:
    t, d, marks = row.target, v.derived, {}
    for key, need in (("x_eager", t.vs_eager), ("x_compile", t.vs_compile), ("copy_fraction", t.bandwidth_fraction)):
        if need:
            have = d.get(key)
            # No baseline measured (e.g. --no-compile): the target is not judged, neither pass nor miss.
            marks[key] = {"need": need, "have": have, "pass": None if have is None else have >= need}
    return marks


# ----- stdout table -------------------------------------------------------------------------------------
def _fmt_time(s: float) -> str:
    if s >= 1:
        return f"{s:7.3f} s "
    if s >= 1e-3:
        return f"{s * 1e3:7.3f} ms"
    return f"{s * 1e6:7.1f} us"


def _fmt_ratio(x) -> str:
    return f"{x:6.2f}x" if x is not None else "     - "


def _fmt_spread(x: float) -> str:
    return "n/a" if math.isnan(x) else "±" + format(x, ".0%")


def _fmt_mb(b) -> str:
    return f"{b / 2**20:8.2f}" if b is not None else "       -"


def _target_text(v: Variant) -> str:
    marks = v.derived.get("target")
    mm = f"{v.derived['matmul_fraction']:.0%} of the mm rate" if "matmul_fraction" in v.derived else ""
    if not marks:
        return mm
    names = {"x_eager": "eager", "x_compile": "compile", "copy_fraction": "copyBW"}
    out = []
    for key, m in marks.items():
        need = f"{m['need']:.0%}" if key == "copy_fraction" else f"{m['need']:g}x"
        verdict = "n/a" if m["pass"] is None else ("pass" if m["pass"] else "MISS")
        out.append(f">={need} {names[key]} {verdict}")
    return "; ".join(out + ([mm] if mm else []))


def table(rows: list[Row], header: list[str]) -> str:
    lines = list(header)
    cols = f"  {'variant':<30} {'median':>10} {'spread':>7} {'vs eager':>8} {'vs compile':>10} {'peak MB':>8} " \
           f"{'GB/s':>7} {'%copy':>6} {'items/s':>10}  target"
    for row in rows:
        floor = f"; floor {row.bytes_floor / 2**20:.2f} MB" if row.bytes_floor else ""
        floor += f"; {row.floor_note}" if row.flops else ""
        lines += ["", f"== {row.name}  ({row.n_inputs} input sets{floor})", *([f"   {row.note}"] if row.note else []),
                  cols]
        for v in row.variants:
            if v.status != "ok":
                lines.append(f"  {v.name:<30} {v.status.upper()}: {v.message}")
                continue
            d = v.derived
            gbs = f"{d['floor_bytes_per_s'] / 1e9:7.1f}" if "floor_bytes_per_s" in d else "      -"
            pct = f"{d['copy_fraction']:6.0%}" if d.get("copy_fraction") is not None else "     -"
            ips = f"{d['items_per_s']:10.4g}" if "items_per_s" in d else "         -"
            lines.append(
                f"  {v.name:<30} {_fmt_time(v.timing.median):>10} {_fmt_spread(v.timing.spread):>7} "
                f"{_fmt_ratio(d.get('x_eager')):>8} {_fmt_ratio(d.get('x_compile')):>10} {_fmt_mb(v.peak_bytes)} "
                f"{gbs} {pct} {ips}  {_target_text(v)}"
            )
    return "\n".join(lines)


# ----- JSON ---------------------------------------------------------------------------------------------
def to_json(rows: list[Row], meta: dict) -> dict:
    out_rows = []
    for row in rows:
        out_rows.append({
            "name": row.name, "group": row.group, "params": {k: _plain(v) for k, v in row.params.items()},
            "n_input_sets": row.n_inputs, "note": row.note, "bytes_floor": row.bytes_floor, "floor_note": row.floor_note,
            "flops": row.flops, "matmul_flops_per_s": row.flop_rate,
            "items_per_call": row.items, "item_unit": row.item_unit,
            "target": row.target.text() if row.target else None,
            "duration_s": row.duration_s,
            "variants": [{
                "name": v.name, "role": v.role, "status": v.status, "message": v.message, "check": v.check_note,
                "timing_s": v.timing.to_json() if v.timing else None, "peak_bytes": v.peak_bytes,
                **{k: v.derived[k] for k in sorted(v.derived)},
            } for v in row.variants],
        })
    return {**meta, "rows": out_rows}


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def write_json(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str, allow_nan=True)
        f.write("\n")
    os.replace(tmp, path)


# ----- chart --------------------------------------------------------------------------------------------
def chart(rows: list[Row], path: str, title: str) -> bool:
    """Horizontal bars: speed-up of every non-eager variant over its row's eager baseline (log scale)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return False
    labels, values, colors, needs = [], [], [], []
    for row in rows:
        for v in row.variants:
            x = v.derived.get("x_eager")
            if v.status != "ok" or v.role == "eager" or x is None or "[reference]" in v.name:
                continue  # the reference path is the oracle, not a contender: it stays in the table and JSON
            labels.append(f"{row.name}  {v.name}")
            values.append(x)
            colors.append("tab:blue" if v.role == "isofast" else "tab:gray")
            marks = v.derived.get("target", {})
            needs.append(marks.get("x_eager", {}).get("need"))
    if not values:
        return False
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    fig, ax = plt.subplots(figsize=(12, 0.26 * len(values) + 1.5))
    ys = range(len(values))
    ax.barh(ys, values, color=colors)
    for y, need in zip(ys, needs, strict=True):
        if need:
            ax.plot([need, need], [y - 0.4, y + 0.4], color="tab:red", lw=2)
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_xscale("log")
    ax.set_yticks(list(ys), labels, fontsize=7)
    lo, hi = min(values), max(values)
    # the axis spans every bar and every target tick (an 8x target must show even when no bar reaches it)
    left, right = min(0.5, lo / 1.5), max(2.0, hi * 1.5, *(need * 1.2 for need in needs if need))
    ax.set_xlim(left, right)
    # ratios read as 0.25x, 0.5x, 1x, 2x, 4x: powers of two, not log-axis labels such as 10^-1
    ticks = [2.0**k for k in range(math.floor(math.log2(left)), math.ceil(math.log2(right)) + 1)]
    ax.xaxis.set_major_locator(FixedLocator([t for t in ticks if left <= t <= right]))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: f"{x:g}x"))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_ylim(len(values) - 0.5, -0.5)
    ax.set_xlabel("speed-up over the eager baseline (median time ratio, same run; red tick: target)")
    ax.set_title(title, fontsize=9)
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color="tab:blue", label="isofast"), Patch(color="tab:gray", label="other baselines")],
              loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7)  # outside the bars: never over a label
    for y, x in zip(ys, values, strict=True):
        ax.text(x, y, f" {x:.2f}x", va="center", fontsize=6)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # bbox "tight" grows the canvas to the long row labels instead of cutting them at the left edge
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return math.isfinite(hi)
