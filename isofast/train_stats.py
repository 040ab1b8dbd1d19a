"""The statistics of a training run: ``metrics.csv`` and TensorBoard scalars, one row per window of steps.

Each step adds its loss, mse, iso_penalty (the penalty term, ``LossParts.iso``), isotropy (the measured
isotropy of eps_pred) and grad norm to per-window sums that stay on the device
(no host sync per step). Every ``log_every`` steps the window's means are averaged over ranks into one
row of `METRIC_FIELDS`, written by rank 0 alone. The sums of an unfinished window are part of the
checkpoint (`TrainStats.state_dict`), so a resumed run logs that window once, in full.
"""
from __future__ import annotations

import csv
import math
import time
import warnings
from pathlib import Path

import torch

from . import distributed
from .io import atomic_write_text
from .reference import LossParts

__all__ = ["METRIC_FIELDS", "TrainStats"]

# One name per quantity, the same in metrics.csv, TensorBoard (train/<name>) and the progress bar:
# iso_penalty = (mean of eps_pred^2 - 1)^2, the term lambda weighs; isotropy = mean of eps_pred^2 (1 is ideal).
METRIC_FIELDS = ("step", "loss", "mse", "iso_penalty", "isotropy", "grad_norm", "lr", "steps_per_s", "images_per_s",
                 "elapsed_s")
_SUMS = ("loss", "mse", "iso_penalty", "isotropy", "grad_norm")
_OLD_NAMES = {"iso": "iso_penalty"}  # runs written before 2026-11-30 (metrics.csv columns, checkpoint windows)


class TrainStats:
    """Window sums of one rank, and (on rank 0) the run's ``out_dir/metrics.csv`` and TensorBoard events.

    ``tensorboard_status``: "off", "on", or "unavailable (why)" once `open` has run.
    """

    def __init__(self, out_dir: Path, device: torch.device, batch_size: int, is_main: bool) -> None:
        self.out_dir, self.device, self.batch_size, self.is_main = Path(out_dir), device, batch_size, is_main
        self.tensorboard_status = "off"
        self._csv = None
        self._csv_writer = None
        self._tb = None
        self._run_start = time.perf_counter()
        self.reset()

    # ----- the window --------------------------------------------------------------------------------
    def reset(self) -> None:
        """Start a new window: zero sums, zero steps, the clock restarted."""
        self._sums = {k: torch.zeros((), device=self.device) for k in _SUMS}
        self.steps = 0
        self._window_start = time.perf_counter()

    def add(self, loss: torch.Tensor, parts: LossParts, grad_norm: torch.Tensor) -> None:
        """Add one step's values (0-dim device tensors) to the window."""
        s = self._sums
        s["loss"] += loss.detach().float()
        s["mse"] += parts.mse.float()
        s["iso_penalty"] += parts.iso.float()
        s["isotropy"] += parts.isotropy.float()
        s["grad_norm"] += grad_norm.detach().float()
        self.steps += 1

    def state_dict(self) -> dict:
        """The unfinished window, for a checkpoint: {"sums": {name: 0-dim tensor}, "steps": int}."""
        return {"sums": dict(self._sums), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.get("sums", {}).items():
            k = _OLD_NAMES.get(k, k)
            if k in self._sums:
                self._sums[k] = v.to(self.device)
        self.steps = int(state.get("steps", 0))

    # ----- the files ---------------------------------------------------------------------------------
    def open(self, resumed_step: int, tensorboard: bool) -> None:
        """Open metrics.csv (and TensorBoard) for appending on rank 0; start the clocks of the run and the window.

        resumed_step: the checkpoint's step (-1 for a fresh run): rows the stopped run wrote past the
        checkpoint's last complete window are dropped, and TensorBoard events past it purged.
        """
        if self.is_main:
            self._open_csv(resumed_step)
            if tensorboard:
                self._open_tensorboard(resumed_step)
        self._run_start = self._window_start = time.perf_counter()

    def _open_csv(self, resumed_step: int) -> None:
        path = self.out_dir / "metrics.csv"
        if path.exists() and resumed_step >= 0:
            # Rows past the checkpoint's last complete window were written by the run that stopped; the
            # checkpoint carries that window's sums, so the resumed run logs those steps again, once.
            keep_upto = resumed_step - self.steps
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= keep_upto]
            rows = [{_OLD_NAMES.get(k, k): v for k, v in r.items()} for r in rows]
            text_rows = [",".join(str(r.get(k, "")) for k in METRIC_FIELDS) for r in rows]
            atomic_write_text(path, ",".join(METRIC_FIELDS) + "\n" + "".join(r + "\n" for r in text_rows))
        new = not path.exists()
        self._csv = open(path, "a", newline="")
        self._csv_writer = csv.DictWriter(self._csv, fieldnames=METRIC_FIELDS)
        if new:
            self._csv_writer.writeheader()
            self._csv.flush()

    def _open_tensorboard(self, resumed_step: int) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter

            purge = resumed_step + 1 if resumed_step >= 0 else None
            self._tb = SummaryWriter(log_dir=str(self.out_dir), purge_step=purge)
            self.tensorboard_status = "on"
        except Exception as exc:  # tensorboard is optional: the CSV has everything
            self.tensorboard_status = f"unavailable ({type(exc).__name__}: {exc})"
            # stacklevel 4: the caller of Trainer.fit
            warnings.warn(f"TensorBoard logging is off: {self.tensorboard_status}; metrics.csv still has "
                          "every metric", RuntimeWarning, stacklevel=4)

    def log(self, step: int, lr: float) -> dict | None:
        """Reduce the window over ranks (a collective), write a CSV row (+ TensorBoard) on rank 0 and start a
        new window; returns the row on rank 0. ``step``: optimizer steps done; ``lr``: that of the last one."""
        if self.steps == 0:
            return None
        n = self.steps
        keys = list(self._sums)
        stacked = torch.stack([self._sums[k] for k in keys]) / n
        stacked = distributed.all_reduce_mean(stacked).cpu()
        values = dict(zip(keys, stacked.tolist(), strict=True))
        elapsed = max(time.perf_counter() - self._window_start, 1e-9)
        if not math.isfinite(values["loss"]):
            raise FloatingPointError(f"the loss became {values['loss']} between steps {step - n + 1} and "
                                     f"{step}: lower lr, enable grad_clip, or check the data")
        row = {
            "step": step,
            **{k: f"{values[k]:.6g}" for k in keys},
            "lr": f"{lr:.6g}",
            "steps_per_s": f"{n / elapsed:.4g}",
            "images_per_s": f"{n * self.batch_size / elapsed:.4g}",
            "elapsed_s": f"{time.perf_counter() - self._run_start:.2f}",
        }
        self.reset()
        if not self.is_main:
            return None
        self._csv_writer.writerow(row)
        self._csv.flush()
        if self._tb is not None:
            for k in ("loss", "mse", "iso_penalty", "isotropy", "grad_norm", "lr", "steps_per_s", "images_per_s"):
                self._tb.add_scalar(f"train/{k}", float(row[k]), step)
        return row

    def close(self) -> None:
        if self._csv is not None:
            self._csv.close()
            self._csv = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
