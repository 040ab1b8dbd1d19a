"""The progress of a benchmark run: one bar whose time left comes from per-row estimates, with library
warnings and log lines written above it rather than into it.

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
import logging
import os
import re
import sys
import warnings

from tqdm.auto import tqdm

# Seconds per row on the 2-core Xeon VM (CPU, torch.compile baselines on), from the full and --quick runs
# of 2026-11-30 (per-row duration_s of benchmarks/results/local/*.json). First match wins.
PRIOR_S = {
    "default": [
        (r"^q_sample/fp32/", 25.0), (r"^q_sample/bf16/", 6.0), (r"^loss fwd\+bwd/.*/fp32/", 30.0),
        (r"^loss fwd\+bwd/", 8.0), (r"^noise\+loss", 35.0), (r"^ddpm step/", 30.0),
        (r"^ddpm sampling/mlp", 60.0), (r"^ddpm sampling/unet", 60.0), (r"^ddim sampling/", 15.0),
        (r"^train step/", 15.0),
    ],
    "quick": [
        (r"^noise\+loss", 30.0), (r"^ddpm sampling/", 5.0), (r".", 3.0),
    ],
}
_FALLBACK_S = 20.0


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
                         bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed} spent, ~{remaining} left] {postfix}")

    def start(self, name: str) -> None:
        self._bar.set_postfix_str(f"row {self._done + 1}/{self._n}: {name}")

    def finish_row(self) -> None:
        self._bar.update(self._estimates[self._done])
        self._done += 1

    def close(self) -> None:
        self._bar.close()


class _AboveTheBar(logging.Handler):
    """Writes each record as a line above the bars (tqdm.write), formatted as the handler it replaces did."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


@contextlib.contextmanager
def library_output_above(bar: RowBar):
    """Python warnings and log records (torch's own loggers included) are written above the bar, as lines.

    The stream handlers of the root and ``torch`` loggers (torch's write straight to stderr, with their own
    format: "W1130 ... No CUDA runtime is found ...") are swapped for `_AboveTheBar` until the block ends.
    """
    def show(message, category, filename, lineno, file=None, line=None):
        tqdm.write(warnings.formatwarning(message, category, filename, lineno, line).rstrip(), file=sys.stderr)

    swapped = []
    for logger in (logging.root, logging.getLogger("torch")):
        for handler in list(logger.handlers):
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                above = _AboveTheBar(handler.level)
                above.setFormatter(handler.formatter)
                logger.removeHandler(handler)
                logger.addHandler(above)
                swapped.append((logger, handler, above))
    if not logging.root.handlers:  # what logging's last resort would print to stderr (torch's loggers do not
        swapped.append((logging.root, None, _AboveTheBar(logging.WARNING)))  # propagate to the root)
        logging.root.addHandler(swapped[-1][2])
    previous = warnings.showwarning
    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous
        for logger, handler, above in swapped:
            logger.removeHandler(above)
            if handler is not None:
                logger.addHandler(handler)
