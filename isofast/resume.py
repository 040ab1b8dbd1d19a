"""Resuming a run: which checkpoint it continues, which settings may change, and what is kept.

What `isofast.train.Trainer.fit` (``resume=True`` or a path; ``isofast train --resume``) guarantees:

* The checkpoint. ``resume=True`` continues the newest complete checkpoint of ``out_dir/checkpoints``:
  the one ``latest`` names, or, when ``latest`` is missing or names an older one, the newest with a
  state.json (said on stderr). Every file of it is verified (sha256 of each tensor file and of state.json,
  `isofast.checkpoint`) before anything trains; a damaged one is refused, naming the checkpoints that do
  verify and the command that resumes the newest of them.
* Nothing lost. A checkpoint is deleted only when newer ones of the same run replace it
  (``keep_checkpoints``). Resuming an older checkpoint of the folder moves the newer complete ones to
  ``checkpoints/set_aside/`` (renamed, never deleted) so the resumed run cannot overwrite them; resuming
  another run's checkpoint into a folder that already holds checkpoints is refused.
* No silent change. The settings that define what is trained (every `TrainConfig` field except
  `FREE_FIELDS`) must equal the checkpoint's; a resume that changes any is refused with the list of
  differences, before any file is written. `FREE_FIELDS` (the step count, intervals, device, speed
  options) may change. A deliberate change names its field in ``override`` (``--override KEY``) and is
  appended to ``out_dir/history.jsonl`` (time, step, key, old, new, checkpoint).
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from . import checkpoint as ckpt_io
from .io import atomic_write_text
from .train_config import TrainConfig

__all__ = ["FREE_FIELDS", "HISTORY", "SET_ASIDE", "ResumeError", "check_destination", "check_override",
           "checkpoint_to_resume", "config_changes", "record_changes", "run_fields", "set_aside_newer",
           "with_recovery_hint"]

# Fields a resume may change: how long, how often to log/save, where and how fast, not what is trained.
FREE_FIELDS = frozenset({"out_dir", "steps", "log_every", "ckpt_every", "keep_checkpoints", "sample_every",
                         "channels_last", "compile", "device", "backend", "num_workers", "progress", "logger"})
HISTORY = "history.jsonl"
SET_ASIDE = "set_aside"

T = TypeVar("T")


class ResumeError(ValueError):
    """A resume refused: it would change the run's settings, or could lose checkpoints."""


def run_fields() -> tuple[str, ...]:
    """The `TrainConfig` fields a resume keeps unless overridden (all but `FREE_FIELDS`)."""
    return tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in FREE_FIELDS)


# ----- settings -------------------------------------------------------------------------------------------
def check_override(override: Iterable[str]) -> frozenset[str]:
    """The field names of ``override`` ("iso-lambda" and "iso_lambda" both name iso_lambda); ValueError for
    a name that is not a field a resume keeps."""
    if isinstance(override, str):
        override = [override]
    names = set()
    for key in override:
        name = str(key).replace("-", "_")
        if name in FREE_FIELDS:
            raise ValueError(f"override {key!r}: {name!r} may change on resume without an override")
        if name not in run_fields():
            raise ValueError(f"override {key!r} is not a setting of the run; the settings a resume keeps unless "
                             f"overridden: {', '.join(run_fields())}")
        names.add(name)
    return frozenset(names)


def config_changes(recorded: dict, config: dict, override: Iterable[str], source: Path) -> dict[str, tuple[Any, Any]]:
    """{field: (old, new)} for the run's settings that ``config`` changes from ``recorded`` (the checkpoint's
    config; a field it does not record, from an older isofast, is not compared). Raises `ResumeError` listing
    every change that ``override`` does not name."""
    allowed = check_override(override)
    changes = {k: (recorded[k], config[k]) for k in run_fields() if k in recorded and recorded[k] != config[k]}
    refused = [k for k in changes if k not in allowed]
    if refused:
        listing = "; ".join(f"{k}: {changes[k][0]!r} -> {changes[k][1]!r}" for k in refused)
        flags = " ".join(f"--override {k}" for k in refused)
        raise ResumeError(
            f"resuming {source} would change settings of the run: {listing}. Leave them out to keep the run's "
            f"own, or change them deliberately: isofast train ... {flags} (API: fit(override={refused!r})); "
            f"deliberate changes are recorded in the run's {HISTORY}")
    return changes


def record_changes(out_dir: Path, step: int, changes: dict[str, tuple[Any, Any]], source: Path) -> None:
    """Append one line per overridden field to ``out_dir/history.jsonl``."""
    if not changes:
        return
    path = Path(out_dir) / HISTORY
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    lines = "".join(json.dumps({"time": now, "step": step, "key": k, "old": old, "new": new,
                                "checkpoint": str(source)}) + "\n" for k, (old, new) in changes.items())
    atomic_write_text(path, (path.read_text() if path.exists() else "") + lines)


# ----- the checkpoint -----------------------------------------------------------------------------------
def checkpoint_to_resume(ckpt_root: Path, resume: bool | str | Path) -> tuple[Path | None, str | None]:
    """(the checkpoint directory ``resume`` means for a run whose checkpoints are in ``ckpt_root``, a note
    for the user when it is not the one ``latest`` names). None: there is none, start afresh."""
    if resume is not True:
        return ckpt_io.resolve_checkpoint(resume), None
    ckpt_root = Path(ckpt_root)
    pointer = ckpt_root / ckpt_io.LATEST
    named = ckpt_io.resolve_checkpoint(ckpt_root) if pointer.is_file() else None
    complete = ckpt_io.list_checkpoints(ckpt_root)
    if named is not None and named.is_dir() and named not in complete:
        return named, None  # damaged: loading it says what is wrong, and which checkpoints verify
    if not complete:
        if named is not None:
            raise ckpt_io.CheckpointError(
                f"{pointer} names {named.name}, which does not exist, and {ckpt_root} holds no complete "
                f"checkpoint: remove {pointer} to start the run afresh")
        return None, None
    newest = complete[-1]
    if named is None:
        return newest, f"{pointer} is missing; resuming from the newest complete checkpoint, {newest}"
    if named != newest:
        why = "an older checkpoint" if named.is_dir() else f"{named.name}, which does not exist"
        return newest, f"{pointer} names {why}; resuming from the newest complete checkpoint, {newest}"
    return newest, None


def _verifies(path: Path) -> bool:
    try:
        ckpt_io.load_checkpoint(path)
    except ckpt_io.CheckpointError:
        return False
    return True


def with_recovery_hint(read: Callable[[Path], T], source: Path, out_dir: Path) -> T:
    """``read(source)``; a `CheckpointError` gets the checkpoints beside ``source`` that verify, and how to
    resume the newest of them."""
    try:
        return read(source)
    except ckpt_io.CheckpointError as exc:
        good = [p for p in ckpt_io.list_checkpoints(source.parent) if p != source and _verifies(p)]
        if not good:
            raise ckpt_io.CheckpointError(f"{exc}; no other checkpoint in {source.parent} verifies") from exc
        newest = good[-1]
        raise ckpt_io.CheckpointError(
            f"{exc}; checkpoints that verify: {', '.join(p.name for p in good)}. To resume from the newest: "
            f"isofast train --out {out_dir} --resume {newest} (API: fit(resume={newest})); checkpoints newer "
            f"than it are then moved to {source.parent / SET_ASIDE}, not deleted") from exc


def check_destination(ckpt_root: Path, source: Path) -> None:
    """Refuse to continue another run's checkpoint in a folder that holds checkpoints of its own (pruning
    would delete them)."""
    if Path(source).parent.resolve() != Path(ckpt_root).resolve() and ckpt_io.list_checkpoints(ckpt_root):
        raise ResumeError(f"{ckpt_root} already holds checkpoints of a run: continuing {source} there would mix "
                          "two runs and prune the other's checkpoints; choose an empty run folder (--out)")


def set_aside_newer(ckpt_root: Path, source: Path) -> list[Path]:
    """Move the complete checkpoints of ``ckpt_root`` newer than ``source`` (one of them) to
    ``ckpt_root/set_aside/`` and point ``latest`` at ``source``; returns where they went."""
    ckpt_root = Path(ckpt_root)
    if Path(source).parent.resolve() != ckpt_root.resolve():
        return []
    newer = [p for p in ckpt_io.list_checkpoints(ckpt_root) if ckpt_io.step_of(p) > ckpt_io.step_of(source)]
    moved = []
    for path in newer:
        target, n = ckpt_root / SET_ASIDE / path.name, 1
        while target.exists():
            target, n = ckpt_root / SET_ASIDE / f"{path.name}.{n}", n + 1
        target.parent.mkdir(exist_ok=True)
        path.rename(target)  # atomic within the filesystem: the checkpoint is here or there, whole
        moved.append(target)
    if moved:
        atomic_write_text(ckpt_root / ckpt_io.LATEST, Path(source).name + "\n")
    return moved
