"""Checkpoints: atomic, verified, resumable.

Layout of a run folder (written by `isofast.train.Trainer`; only rank 0 writes)::

    <out_dir>/checkpoints/step_0001000/
        model.safetensors   the model's state_dict (unwrapped: no DDP/compile prefixes)
        ema.safetensors     the EMA weights (absent when EMA is off)
        state.safetensors   every tensor of the trainer state: optimizer moments and steps, RNG states
        state.json          written last: format/version, step, the trainer state's structure (tensors
                            replaced by {"__tensor__": name-in-state.safetensors}), the run's config,
                            the model spec, the byte size + sha256 of each file above, and the sha256
                            of all of that (``record_sha256``), so state.json itself is checked too
    <out_dir>/checkpoints/latest   the name of the newest complete checkpoint ("step_0001000"), written last

Why this scheme: weights stay in plain safetensors files that any tool can read; the optimizer
state (a nested dict with int keys, tuples and tensors) is split losslessly into a JSON tree and a
flat tensor file (`flatten_state` / `unflatten_state`), so nothing is pickled and loading executes
no code. The sha256 in state.json catches truncated and bit-flipped files, which safetensors alone
would not notice inside tensor data; ``record_sha256`` (over the canonical JSON of every other field of
state.json) catches an edited or damaged state.json: a changed step, Adam beta or RNG state. Equal
checkpoints are equal files, byte for byte (safetensors metadata is written in sorted order,
`isofast.io.atomic_write_tensors`), so a ``sha256sum`` of two equal runs agrees.

Atomicity: every file is written whole or not at all (`isofast.io`: a temporary name in its own
directory, fsync-ed, ``os.replace``-d over its final name). A checkpoint is complete once
its state.json exists (it is written after the files it describes); ``latest`` moves only after
that, and older checkpoints are pruned (keeping ``keep`` complete ones) only after ``latest``
moved. A process killed at any instant leaves ``latest`` naming a complete checkpoint.

Loading a damaged checkpoint raises `CheckpointError` naming the file and what is wrong with it;
loading weights into a model of another configuration raises `CheckpointError` listing the
missing, unexpected and mis-shaped keys.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from .io import atomic_write_tensors, atomic_write_text
from .models.registry import build_model
from .schedule import NoiseSchedule

__all__ = [
    "CHECKPOINT_FORMAT",
    "Checkpoint",
    "CheckpointError",
    "capture_rng",
    "check_state_dict",
    "checkpoint_meta",
    "flatten_state",
    "list_checkpoints",
    "load_checkpoint",
    "load_state_dict_checked",
    "load_trained_model",
    "resolve_checkpoint",
    "restore_rng",
    "save_checkpoint",
    "step_of",
    "unflatten_state",
]

CHECKPOINT_FORMAT = "isofast-checkpoint"
CHECKPOINT_VERSION = 2  # 2: state.json carries record_sha256
LATEST = "latest"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, truncated, corrupted, or made for another model."""


# ----- checksums -------------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _record_sha256(record: dict) -> str:
    """sha256 of state.json's fields other than ``record_sha256``, as canonical JSON (sorted keys, no spaces):
    the same for the record written and the record read back (JSON floats and ints round-trip exactly)."""
    fields = {k: v for k, v in record.items() if k != "record_sha256"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


# ----- lossless split of nested state into JSON + tensors ---------------------------------------------
def flatten_state(obj: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """Split ``obj`` (nested dicts/lists/tuples of tensors, numbers, strings, None, numpy arrays) into
    a JSON-serialisable tree and a flat ``{name: tensor}`` dict. `unflatten_state` inverts it exactly.

    Encoding: a tensor becomes ``{"__tensor__": name}``; a tuple ``{"__tuple__": [...]}``; a dict whose
    keys are not all plain strings ``{"__dict__": [[key, value], ...]}``; a numpy array
    ``{"__ndarray__": list, "dtype": str}`` (only small ones, e.g. numpy's RNG state, are expected).
    """
    tensors: dict[str, torch.Tensor] = {}

    def enc(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            name = path or "tensor"
            tensors[name] = x
            return {"__tensor__": name}
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, np.ndarray):
            return {"__ndarray__": x.tolist(), "dtype": str(x.dtype)}
        if isinstance(x, tuple):
            return {"__tuple__": [enc(v, f"{path}.{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [enc(v, f"{path}.{i}") for i, v in enumerate(x)]
        if isinstance(x, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in x):
                return {k: enc(v, f"{path}.{k}" if path else k) for k, v in x.items()}
            return {"__dict__": [[enc(k, f"{path}.key{i}"), enc(v, f"{path}.{k}" if path else str(k))]
                                 for i, (k, v) in enumerate(x.items())]}
        raise TypeError(f"cannot store {type(x).__name__} at {path or '<root>'} in a checkpoint")

    return enc(obj, prefix), tensors


def unflatten_state(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `flatten_state`."""
    if isinstance(tree, list):
        return [unflatten_state(v, tensors) for v in tree]
    if isinstance(tree, dict):
        if "__tensor__" in tree:
            name = tree["__tensor__"]
            if name not in tensors:
                raise CheckpointError(f"state refers to tensor {name!r}, which the tensor file does not hold")
            return tensors[name]
        if "__tuple__" in tree:
            return tuple(unflatten_state(v, tensors) for v in tree["__tuple__"])
        if "__dict__" in tree:
            return {_hashable(unflatten_state(k, tensors)): unflatten_state(v, tensors) for k, v in tree["__dict__"]}
        if "__ndarray__" in tree:
            return np.asarray(tree["__ndarray__"], dtype=np.dtype(tree["dtype"]))
        return {k: unflatten_state(v, tensors) for k, v in tree.items()}
    return tree


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, (list, tuple)) else key


# ----- RNG state -----------------------------------------------------------------------------------------
def capture_rng(generators: dict[str, torch.Generator] | None = None, device: torch.device | None = None) -> dict:
    """Every RNG stream a training step may touch: torch's CPU generator, the CUDA generator of ``device``
    (when it is a CUDA device), numpy's and Python's global generators, and the named ``generators``."""
    state: dict[str, Any] = {
        "torch_cpu": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    if device is not None and torch.device(device).type == "cuda":
        state["torch_cuda"] = torch.cuda.get_rng_state(torch.device(device))
    return state


def restore_rng(state: dict, generators: dict[str, torch.Generator] | None = None,
                device: torch.device | None = None) -> None:
    """Restore what `capture_rng` captured (a named generator missing from ``state`` is an error)."""
    torch.set_rng_state(state["torch_cpu"].to(torch.uint8).cpu())
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.asarray(np_state[1], dtype=np.uint32), *np_state[2:]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    for name, g in (generators or {}).items():
        if name not in state["generators"]:
            raise CheckpointError(f"the checkpoint has no state for generator {name!r}")
        g.set_state(state["generators"][name].to(torch.uint8).cpu())
    if device is not None and torch.device(device).type == "cuda" and "torch_cuda" in state:
        torch.cuda.set_rng_state(state["torch_cuda"].to(torch.uint8).cpu(), torch.device(device))


# ----- saving --------------------------------------------------------------------------------------------
def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def save_checkpoint(
    root: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    ema_state: dict[str, torch.Tensor] | None = None,
    state: dict | None = None,
    meta: dict | None = None,
    keep: int = 2,
) -> Path:
    """Write checkpoint ``root/step_XXXXXXX`` (see the module docstring), move ``latest``, prune old ones.

    ``state``: nested trainer state (optimizer state_dict, RNG states, ...); ``meta``: JSON-able facts
    stored in state.json (config, model spec). Keeps the ``keep`` newest complete checkpoints (>= 1).
    Returns the checkpoint directory.
    """
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be an int >= 1, got {keep!r}")
    root = Path(root)
    directory = root / step_dir_name(step)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "state.json").unlink(missing_ok=True)  # rewriting a step: incomplete until the new state.json

    tree, tensors = flatten_state(state or {})
    files = {"model.safetensors": model_state, "state.safetensors": tensors}
    if ema_state is not None:
        files["ema.safetensors"] = ema_state
    else:
        (directory / "ema.safetensors").unlink(missing_ok=True)
    manifest = {}
    for name, content in files.items():
        path = directory / name
        atomic_write_tensors(path, content, metadata={"format": CHECKPOINT_FORMAT, "step": str(step)})
        manifest[name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    record = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "step": int(step),
        "files": manifest,
        "state": tree,
        "torch_version": torch.__version__,
        **(meta or {}),
    }
    record["record_sha256"] = _record_sha256(record)
    atomic_write_text(directory / "state.json", json.dumps(record, indent=1))
    atomic_write_text(root / LATEST, directory.name + "\n")
    _prune(root, keep, directory)
    return directory


def _prune(root: Path, keep: int, newest: Path) -> None:
    complete = list_checkpoints(root)
    doomed = [p for p in complete[:-keep] if p != newest]
    # Incomplete leftovers of killed runs that are older than the newest complete checkpoint.
    newest_step = step_of(newest)
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and not (p / "state.json").exists() and int(m.group(1)) < newest_step:
            doomed.append(p)
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".*.tmp"):  # a temp file of an interrupted `latest` write
        p.unlink(missing_ok=True)


def step_of(path: Path) -> int:
    """The step of checkpoint directory ``path`` (``step_0001000`` -> 1000; -1 for another name)."""
    m = _STEP_DIR.match(path.name)
    return int(m.group(1)) if m else -1


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints (those with a state.json) under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=step_of)


# ----- loading --------------------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    """A loaded checkpoint: weights (CPU tensors), the trainer state, and state.json's other fields."""

    path: Path
    step: int
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None
    state: dict
    meta: dict


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory meant by ``path``: a step directory itself, or the one ``latest`` names in
    ``path`` (a checkpoints folder) or in ``path/checkpoints`` (a run folder)."""
    path = Path(path)
    if (path / "state.json").exists() or _STEP_DIR.match(path.name):
        return path
    for root in (path, path / "checkpoints"):
        pointer = root / LATEST
        if pointer.is_file():
            name = pointer.read_text().strip()
            if not _STEP_DIR.match(name):
                raise CheckpointError(f"{pointer} does not name a checkpoint (contains {name[:40]!r})")
            return root / name
    raise CheckpointError(f"no checkpoint at {path}: expected a step_XXXXXXX directory, or a folder with a "
                          f"'{LATEST}' file (checked {path / LATEST} and {path / 'checkpoints' / LATEST})")


def _read_tensors(path: Path, expected: dict | None) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    if expected is not None:
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(f"checkpoint file {path} is truncated or damaged: {size} bytes, "
                                  f"state.json recorded {expected['bytes']}")
        if _sha256(path) != expected["sha256"]:
            raise CheckpointError(f"checkpoint file {path} is corrupted: its sha256 differs from the one "
                                  "recorded in state.json")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint file {path} cannot be read as safetensors: {exc}") from exc


def _read_record(directory: Path) -> dict:
    """state.json of checkpoint ``directory``, checked: an isofast record of a version this code reads, whose
    ``record_sha256`` matches its contents (version-1 records, from before it existed, load with a warning)."""
    state_json = directory / "state.json"
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    if not state_json.is_file():
        raise CheckpointError(f"checkpoint {directory} is incomplete: {state_json} is missing "
                              "(the run was probably stopped while writing it)")
    try:
        record = json.loads(state_json.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint file {state_json} is corrupted: not valid JSON ({exc})") from exc
    if not isinstance(record, dict) or record.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{state_json} is not an isofast checkpoint record")
    version = record.get("version", 0)
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise CheckpointError(f"{state_json} has format version {version!r}; this isofast reads "
                              f"up to {CHECKPOINT_VERSION}")
    if version >= 2 and record.get("record_sha256") != _record_sha256(record):
        raise CheckpointError(f"checkpoint file {state_json} was edited or is damaged: its contents do not "
                              "match the checksum it records (record_sha256)")
    if version < 2:
        warnings.warn(f"{state_json} was written by an older isofast (format version {version}): its own "
                      "contents (step, optimizer and RNG state) are not checksummed", RuntimeWarning, stacklevel=3)
    return record


def checkpoint_meta(path: str | Path) -> dict:
    """The checked state.json fields (step, config, model_spec, ...) of the checkpoint at ``path`` (see
    `resolve_checkpoint`), without reading its tensor files: what a resume needs to rebuild the run."""
    directory = resolve_checkpoint(path)
    record = _read_record(directory)
    return {k: v for k, v in record.items() if k not in ("state", "files")}


def load_checkpoint(path: str | Path, verify: bool = True) -> Checkpoint:
    """Load the checkpoint at ``path`` (see `resolve_checkpoint`). Tensors are on the CPU.

    state.json is always checked against its ``record_sha256``; ``verify`` also checks each tensor file's
    size and sha256 against state.json. Any problem raises `CheckpointError` naming the file.
    """
    directory = resolve_checkpoint(path)
    record = _read_record(directory)
    files = record.get("files", {})

    def read(name: str) -> dict[str, torch.Tensor]:
        return _read_tensors(directory / name, files.get(name) if verify else None)

    model = read("model.safetensors")
    ema = read("ema.safetensors") if "ema.safetensors" in files else None
    state = unflatten_state(record.get("state", {}), read("state.safetensors"))
    meta = {k: v for k, v in record.items() if k not in ("state", "files")}
    return Checkpoint(directory, int(record["step"]), model, ema, state, meta)


def check_state_dict(module: nn.Module, state: dict[str, torch.Tensor], source: str | Path = "checkpoint") -> None:
    """Raise `CheckpointError` if ``state`` does not fit ``module`` exactly: lists missing keys,
    unexpected keys and shape mismatches (the usual sign of a checkpoint from another model config)."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        def few(items: list[str]) -> str:
            return ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")

        parts = []
        if shapes:
            parts.append(f"shape mismatches: {few(shapes)}")
        if missing:
            parts.append(f"missing keys: {few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {few(unexpected)}")
        raise CheckpointError(f"{source} does not match the model (was it saved from another model "
                              f"config?): " + "; ".join(parts))


def load_state_dict_checked(module: nn.Module, state: dict[str, torch.Tensor], source: str | Path = "checkpoint") -> None:
    """`check_state_dict`, then load (values are copied into the module's tensors, keeping their device,
    dtype and memory format)."""
    check_state_dict(module, state, source)
    module.load_state_dict(state)


# ----- rebuilding a trained model -----------------------------------------------------------------------
def load_trained_model(path: str | Path, which: str = "ema", device: str | torch.device = "cpu"):
    """Rebuild the model of a checkpoint written by the Trainer and load its weights.

    ``which``: "ema" (the EMA weights; the raw ones when the run had no EMA) or "model".
    Returns (model in eval mode on ``device``, the run's `NoiseSchedule` on ``device``, the checkpoint meta).
    """
    if which not in ("ema", "model"):
        raise ValueError(f"which must be 'ema' or 'model', got {which!r}")
    ckpt = load_checkpoint(path)
    spec = ckpt.meta.get("model_spec")
    if spec is None:
        raise CheckpointError(f"{ckpt.path / 'state.json'} records no model_spec: rebuild the model yourself "
                              "and load model.safetensors / ema.safetensors into it")
    model = build_model(spec)
    weights = ckpt.ema if which == "ema" and ckpt.ema is not None else ckpt.model
    name = "ema.safetensors" if weights is ckpt.ema else "model.safetensors"
    load_state_dict_checked(model, weights, ckpt.path / name)
    config = ckpt.meta.get("config", {})
    sched = NoiseSchedule.from_name(config.get("schedule", "linear"), int(config.get("T", 1000)))
    return model.to(device).eval(), sched.to(device), ckpt.meta
