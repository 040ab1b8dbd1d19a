"""Files written whole or not at all: readers see the old file or the complete new one, never a part.

Every writer here writes to a temporary name in the target's own directory, fsyncs it, gives it the
usual permissions (0666 less the umask), ``os.replace``-s it over the final name and fsyncs the
directory. A process killed at any instant leaves either the old file or the new one (and at most
a stray ``.<name>.*.tmp`` beside it).
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_tensors", "atomic_write_text", "check_writable_dir"]


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some filesystems/OSes cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give them the usual permissions
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never a part."""
    atomic_write(Path(path), lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write ``{name: tensor}`` as a safetensors file (tensors copied to contiguous CPU memory first)."""
    # safetensors wants contiguous CPU tensors that share no storage (tied weights are cloned).
    seen: set[int] = set()
    clean = {}
    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"tensor {name!r} to save is a {type(value).__name__}, not a torch.Tensor")
        t = value.detach().to("cpu").contiguous()
        if t.numel() and t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        if t.numel():
            seen.add(t.untyped_storage().data_ptr())
        clean[name] = t

    def write(tmp: Path) -> None:
        save_file(clean, str(tmp), metadata=metadata)
        _sort_metadata(tmp)

    atomic_write(path, write)


def _sort_metadata(path: Path) -> None:
    """Rewrite a safetensors header with its metadata keys sorted, in place.

    safetensors keeps the metadata in a hash map whose order changes from one call to the next, so equal
    tensors would give files of different bytes (and sha256). Sorting changes only the order of the same
    keys and values: the header keeps its length and the tensor data stays where it is.
    """
    with open(path, "r+b") as f:
        length = int.from_bytes(f.read(8), "little")
        raw = f.read(length)
        header = json.loads(raw)
        metadata = header.get("__metadata__")
        if not metadata or len(metadata) < 2:
            return
        header["__metadata__"] = dict(sorted(metadata.items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) > length:  # cannot happen for a header safetensors wrote; never move the data
            raise RuntimeError(f"{path}: sorted safetensors header is longer than the original")
        f.seek(8)
        f.write(text.ljust(length, b" "))  # safetensors pads its header with spaces


def check_writable_dir(path: str | Path) -> None:
    """Create folder ``path`` (and its parents) if needed and check a file can be written in it; raises OSError."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    probe = path / ".write_test"
    probe.write_text("ok")
    probe.unlink()


def writable_output_dir(path: str | Path) -> Path:
    """`check_writable_dir` for a command's output folder: a PermissionError naming it when it cannot be used."""
    try:
        check_writable_dir(path)
    except OSError as exc:
        raise PermissionError(f"output folder {str(path)!r} is not writable: {exc}") from exc
    return Path(path)


def resumed_record(out: Path, record: str, resume: bool, what: str) -> dict | None:
    """The settings ``out / record`` holds, read when ``resume`` continues what is recorded there; None when
    nothing is recorded. FileExistsError (naming ``what``) when something is and ``resume`` is False."""
    path = out / record
    if not path.exists():
        return None
    if not resume:
        raise FileExistsError(f"output folder {str(out)!r} already holds {what}: pass --resume to continue it, "
                              "or choose another --out")
    return json.loads(path.read_text())


def refuse_changed_settings(out: Path, record: str, old: dict, new: dict, *, ignore: tuple[str, ...] = (),
                            recorded_defaults: dict | None = None, hint: str = "") -> None:
    """Raise ValueError naming every setting of ``new`` whose value differs from ``old`` (those recorded in
    ``out / record`` by the run being resumed), except those in ``ignore``. ``recorded_defaults``: the
    value of a setting absent from records older than it. Values are compared as JSON has them."""
    new = json.loads(json.dumps(new))  # tuples are lists, as in the record
    defaults = recorded_defaults or {}
    changed = [k for k, v in new.items() if k not in ignore and old.get(k, defaults.get(k)) != v]
    if changed:
        raise ValueError(f"cannot resume {str(out)!r}: its {record} has other values of {', '.join(changed)}"
                         + (f" ({hint})" if hint else ""))

