"""Where a run's metric rows go besides ``metrics.csv``: TensorBoard events or a Weights & Biases run.

A sink receives the rows `isofast.train_stats.TrainStats` writes to metrics.csv and records the same
quantities under the same names, ``train/<name>`` (one name per quantity in every record). Only rank 0
opens one. TensorBoard comes with torch (`torch.utils.tensorboard`); wandb is optional (``pip install
wandb``, or the ``wandb`` extra), imported only when asked for, and with ``WANDB_MODE=offline`` it writes
its run under ``out_dir/wandb/`` without touching the network (``wandb sync`` uploads it later).
"""
from __future__ import annotations

import os
import secrets
import warnings
from pathlib import Path

__all__ = ["SCALARS", "WANDB_RUN_ID", "LoggerMissingError", "TensorBoardSink", "WandbSink", "open_sink",
           "require_wandb"]

# The numeric columns of metrics.csv a sink records (step is the x axis; elapsed_s is the clock's business).
SCALARS = ("loss", "mse", "iso_penalty", "isotropy", "grad_norm", "lr", "steps_per_s", "images_per_s",
           "skipped_steps")
WANDB_RUN_ID = "wandb_run_id"  # in out_dir: a resumed run continues its W&B run rather than starting another


class LoggerMissingError(ImportError):
    """A logger was asked for whose package is not installed (the message says what to install)."""


def require_wandb():
    """The wandb module, or `LoggerMissingError` saying how to install it."""
    try:
        import wandb
    except ImportError as exc:
        raise LoggerMissingError(
            "logger 'wandb' (--logger wandb) needs the wandb package, which is not installed: pip install wandb "
            "(or pip install \"isofast[wandb]\"); --logger tensorboard or csv need nothing more") from exc
    return wandb


def _numbers(row: dict) -> dict[str, float]:
    # An empty cell (a window whose every step was skipped has no loss) is left out, not logged as 0.
    return {f"train/{k}": float(row[k]) for k in SCALARS if row.get(k, "") != ""}


class TensorBoardSink:
    """TensorBoard events in ``out_dir``; on resume, events past the checkpoint's step are purged."""

    name = "tensorboard"

    def __init__(self, out_dir: Path, resumed_step: int, run_config: dict | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        purge = resumed_step + 1 if resumed_step >= 0 else None
        self._writer = SummaryWriter(log_dir=str(out_dir), purge_step=purge)

    def write(self, row: dict, step: int) -> None:
        for key, value in _numbers(row).items():
            self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        self._writer.close()


class WandbSink:
    """A W&B run under ``out_dir/wandb`` (project $WANDB_PROJECT, else "isofast"; named after out_dir),
    with the run's config. Its id is kept in ``out_dir/wandb_run_id``, so a resumed run continues it."""

    name = "wandb"

    def __init__(self, out_dir: Path, resumed_step: int, run_config: dict | None = None) -> None:
        wandb = require_wandb()
        id_file = Path(out_dir) / WANDB_RUN_ID
        run_id = id_file.read_text().strip() if resumed_step >= 0 and id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(dir=str(out_dir), id=run_id, resume="allow", name=Path(out_dir).name,
                              project=os.environ.get("WANDB_PROJECT", "isofast"), config=run_config or {})
        # Rows are keyed by train/step, not wandb's own step: a resumed run re-logs the window its checkpoint
        # held, which wandb's monotonic step would drop.
        self.run.define_metric("train/step")
        self.run.define_metric("train/*", step_metric="train/step")

    def write(self, row: dict, step: int) -> None:
        self.run.log({"train/step": step, **_numbers(row)})

    def close(self) -> None:
        self.run.finish()


def open_sink(logger: str, out_dir: Path, resumed_step: int, run_config: dict | None = None,
              ) -> tuple[TensorBoardSink | WandbSink | None, str]:
    """(the sink of ``logger``, its status: "off", "on" or "unavailable (why)"). "csv" has no sink. TensorBoard
    that fails to start is a warning (metrics.csv has everything); wandb that is missing is an error, since
    it was asked for by name (`LoggerMissingError`)."""
    if logger == "csv":
        return None, "off"
    if logger == "wandb":
        return WandbSink(out_dir, resumed_step, run_config), "on"
    try:
        return TensorBoardSink(out_dir, resumed_step), "on"
    except Exception as exc:  # tensorboard is optional: the CSV has everything
        status = f"unavailable ({type(exc).__name__}: {exc})"
        # stacklevel 5: the caller of Trainer.fit
        warnings.warn(f"TensorBoard logging is off: {status}; metrics.csv still has every metric",
                      RuntimeWarning, stacklevel=5)
        return None, status
