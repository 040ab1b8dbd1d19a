"""The statistics of a training run: ``metrics.csv`` (and TensorBoard or W&B), one row per window of steps.

Each optimizer step adds its loss, mse, iso_penalty (the penalty term, ``LossParts.iso``), isotropy (the
measured isotropy of eps_pred) and grad norm to per-window sums that stay on the device (no host sync per
step); with gradient accumulation these are the means over the step's micro-batches. A step that fp16's
loss scaler skipped (its gradients overflowed) adds nothing but a count, ``skipped_steps``, so a row's means
are over the steps taken. Every ``log_every`` steps the window's means are averaged over ranks into one
row of `METRIC_FIELDS`, written by rank 0 alone to metrics.csv and to the run's logger
(`isofast.train_loggers`). The sums of an unfinished window are part of the checkpoint
(`TrainStats.state_dict`), so a resumed run logs that window once, in full.
"""
from __future__ import annotations

import csv
import math
import time
from pathlib import Path

import torch

from . import distributed
from .io import atomic_write_text
from .reference import LossParts
from .train_loggers import open_sink

__all__ = ["METRIC_FIELDS", "TrainStats"]

# One name per quantity, the same in metrics.csv, TensorBoard and W&B (train/<name>) and the progress bar:
# iso_penalty = (mean of eps_pred^2 - 1)^2, the term lambda weighs; isotropy = mean of eps_pred^2 (1 is ideal);
# skipped_steps: steps of the window whose fp16 gradients overflowed (not taken; 0 in fp32 and bf16).
METRIC_FIELDS = ("step", "loss", "mse", "iso_penalty", "isotropy", "grad_norm", "lr", "steps_per_s", "images_per_s",
                 "elapsed_s", "skipped_steps")
_SUMS = ("loss", "mse", "iso_penalty", "isotropy", "grad_norm")
_OLD_NAMES = {"iso": "iso_penalty"}  # runs written before 2026-11-30 (metrics.csv columns, checkpoint windows)


class TrainStats:
    """Window sums of one rank, and (on rank 0) the run's ``out_dir/metrics.csv`` and its logger's records.

    batch_size: samples per optimizer step (for images_per_s). ``logger_status``: "csv", or the logger's name
    and state ("tensorboard on", "tensorboard unavailable (why)", "wandb on") once `open` has run.
    """

    def __init__(self, out_dir: Path, device: torch.device, batch_size: int, is_main: bool) -> None:
        self.out_dir, self.device, self.batch_size, self.is_main = Path(out_dir), device, batch_size, is_main
        self.logger_status = "csv"
        self._csv = None
        self._csv_writer = None
        self._sink = None
        self._run_start = time.perf_counter()
        self.reset()

    # ----- the window --------------------------------------------------------------------------------
    def reset(self) -> None:
        """Start a new window: zero sums, zero steps, the clock restarted."""
        self._sums = {k: torch.zeros((), device=self.device) for k in _SUMS}
        self.steps = 0  # steps in the window, taken or skipped
        self.skipped = 0
        self._window_start = time.perf_counter()

    def add(self, loss: torch.Tensor, parts: LossParts, grad_norm: torch.Tensor, skipped: bool = False) -> None:
        """Add one step's values (0-dim device tensors) to the window; a skipped step only counts."""
        self.steps += 1
        if skipped:
            self.skipped += 1
            return
        s = self._sums
        s["loss"] += loss.detach().float()
        s["mse"] += parts.mse.float()
        s["iso_penalty"] += parts.iso.float()
        s["isotropy"] += parts.isotropy.float()
        s["grad_norm"] += grad_norm.detach().float()

    def state_dict(self) -> dict:
        """The unfinished window, for a checkpoint: {"sums": {name: 0-dim tensor}, "steps": int, "skipped": int}."""
        return {"sums": dict(self._sums), "steps": self.steps, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.get("sums", {}).items():
            k = _OLD_NAMES.get(k, k)
            if k in self._sums:
                self._sums[k] = v.to(self.device)
        self.steps = int(state.get("steps", 0))
        self.skipped = int(state.get("skipped", 0))

    @property
    def tensorboard_status(self) -> str:
        """"off", "on", or "unavailable (why)": whether TensorBoard events are written."""
        name, _, state = self.logger_status.partition(" ")
        return state if name == "tensorboard" else "off"

    # ----- the files ---------------------------------------------------------------------------------
    def open(self, resumed_step: int, logger: str = "csv", run_config: dict | None = None) -> None:
        """Open metrics.csv for appending, and the ``logger``'s record ("csv": none; `isofast.train_loggers`), on
        rank 0; start the clocks of the run and the window. ``run_config``: the run's settings, for W&B.

        resumed_step: the checkpoint's step (-1 for a fresh run): rows the stopped run wrote past the
        checkpoint's last complete window are dropped, and TensorBoard events past it purged.
        """
        if self.is_main:
            self._open_csv(resumed_step)
            self._sink, status = open_sink(logger, self.out_dir, resumed_step, run_config)
            self.logger_status = logger if logger == "csv" else f"{logger} {status}"
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

    def log(self, step: int, lr: float) -> dict | None:
        """Reduce the window over ranks (a collective), write a CSV row (+ TensorBoard) on rank 0 and start a
        new window; returns the row on rank 0. ``step``: optimizer steps done; ``lr``: that of the last one."""
        if self.steps == 0:
            return None
        n, taken = self.steps, self.steps - self.skipped
        keys = list(self._sums)
        # Every rank takes or skips the same steps (DDP's gradients, hence their overflow, are shared).
        stacked = torch.stack([self._sums[k] for k in keys]) / max(taken, 1)
        stacked = distributed.all_reduce_mean(stacked).cpu()
        values = dict(zip(keys, stacked.tolist(), strict=True))
        elapsed = max(time.perf_counter() - self._window_start, 1e-9)
        if taken and not math.isfinite(values["loss"]):
            raise FloatingPointError(f"the loss became {values['loss']} between steps {step - n + 1} and "
                                     f"{step}: lower lr, enable grad_clip, or check the data")
        row = {
            "step": step,
            **{k: f"{values[k]:.6g}" if taken else "" for k in keys},  # all skipped: no value, not a 0
            "lr": f"{lr:.6g}",
            "steps_per_s": f"{n / elapsed:.4g}",
            "images_per_s": f"{n * self.batch_size / elapsed:.4g}",
            "elapsed_s": f"{time.perf_counter() - self._run_start:.2f}",
            "skipped_steps": str(self.skipped),
        }
        self.reset()
        if not self.is_main:
            return None
        self._csv_writer.writerow(row)
        self._csv.flush()
        if self._sink is not None:
            self._sink.write(row, step)
        return row

    def close(self) -> None:
        if self._csv is not None:
            self._csv.close()
            self._csv = None
        if self._sink is not None:
            self._sink.close()
            self._sink = None
