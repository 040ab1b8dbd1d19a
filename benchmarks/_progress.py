"""The progress of a benchmark run: one bar whose time left comes from per-row estimates, with what
libraries write to stderr (warnings, log lines) written above it rather than into it.

Rows differ in cost by 100x (a q_sample row takes seconds, a UNet sampling run minutes), so counting rows
predicts nothing. Each row has an estimate of its seconds: what the newest earlier run of the same device
and mode recorded for it (its JSON's ``duration_s``), else the prior below. The bar advances by a row's
estimate when the row ends; time left = estimates left x (seconds spent / estimates done), i.e. the
estimates rescaled by how fast this machine runs them now.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import sys

from tqdm.auto import tqdm

# Seconds per row where no earlier run of this device and mode is at hand: the timed seconds of each row
# (calls x median, all variants) in the reference runs on the 2-core Xeon VM (results/cpu-intel-xeon-2c*.json,
# 2026-11-25, load 1-2; torch.compile's cache was warm there, so a cold first run spends more on the op rows
# than this says and the time left shrinks as the run goes). First match wins.
PRIOR_S = {
    "default": [
        (r"^ddpm sampling/mlp", 175.0), (r"^ddpm sampling/unet", 75.0), (r"^ddim sampling/", 3.6),
        (r"^train step/", 2.2),
        # not in those runs: its duration on the same VM at load 6.4 (2026-11-30; no quieter run yet)
        (r"^diffusers loop step/", 15.0), (r".", 3.0),
    ],
    "quick": [
        (r"^noise\+loss", 0.5), (r"^ddpm sampling/mlp", 1.1), (r"^ddpm sampling/unet", 1.6),
        (r"^ddim sampling/", 0.8), (r".", 0.4),
    ],
}
_FALLBACK_S = 3.0


def previous_durations(folders: list[str], device_name: str, mode: str) -> dict[str, float]:
    """Row name -> seconds, from the newest finished JSON of ``device_name`` and ``mode`` in ``folders``."""
    newest, newest_date = {}, ""
    for folder in folders:
        for path in glob.glob(os.path.join(folder, f"{device_name}*.json")):
            try:
                with open(path) as f:
                    data = json.load(f)
            except (OSError, ValueError):
                continue
            date = data.get("machine", {}).get("date_utc", "")
            if data.get("mode") != mode or data.get("partial") or date <= newest_date:
                continue
            rows = {r["name"]: r["duration_s"] for r in data.get("rows", []) if r.get("duration_s")}
            if rows:
                newest, newest_date = rows, date
    return newest


def estimates(names: list[str], mode: str, previous: dict[str, float]) -> list[float]:
    """Estimated seconds of each row: its earlier duration, else the first matching prior."""
    out = []
    for name in names:
        if name in previous:
            out.append(previous[name])
            continue
        prior = next((s for pattern, s in PRIOR_S.get(mode, []) if re.search(pattern, name)), _FALLBACK_S)
        out.append(prior)
    return out


class RowBar:
    """A bar over rows, advanced by estimated seconds; shows the row running and `i/n`."""

    def __init__(self, names: list[str], row_estimates: list[float]) -> None:
        self._estimates = row_estimates
        self._n = len(names)
        self._done = 0
        # smoothing=0: the rate is the whole run's average (estimate-seconds per second), not the last row's
        self._bar = tqdm(total=round(sum(row_estimates), 1), desc="throughput", unit="est.s", file=sys.stderr,
                         dynamic_ncols=True, smoothing=0,
                         bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed} spent, ~{remaining} left]{postfix}")

    def start(self, name: str) -> None:
        self._bar.set_postfix_str(f"row {self._done + 1}/{self._n}: {name}")

    def finish_row(self) -> None:
        self._bar.update(self._estimates[self._done])
        self._done += 1

    def close(self) -> None:
        self._bar.close()


class _LinesAboveTheBar:
    """A stand-in for sys.stderr: whole lines written to it go above the bars (tqdm.write to the real stderr)."""

    def __init__(self, real) -> None:
        self._real, self._pending = real, ""

    def write(self, text: str) -> int:
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            tqdm.write(line, file=self._real)
        return len(text)

    def flush(self) -> None:
        if self._pending:
            tqdm.write(self._pending, file=self._real)
            self._pending = ""
        self._real.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding, ...: the real stream's
        return getattr(self._real, name)


@contextlib.contextmanager
def library_output_above(bar: RowBar):
    """What libraries write to sys.stderr while the bar runs (Python warnings, log records: torch's handlers
    follow sys.stderr, e.g. "W1130 ... No CUDA runtime is found ...") is written above the bar, line by line.

    The bar itself holds the real stderr (it was made before the block). Output written to file descriptor 2
    by C++ code bypasses sys.stderr and is not caught.
    """
    real = sys.stderr
    sys.stderr = _LinesAboveTheBar(real)
    try:
        yield
    finally:
        sys.stderr.flush()
        sys.stderr = real
