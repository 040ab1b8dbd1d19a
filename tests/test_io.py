"""Atomic file writing: whole files or none, no temporary files left, the usual permissions."""
import os

import pytest
import torch
from safetensors.torch import load_file

from isofast.io import atomic_write, atomic_write_bytes, atomic_write_tensors, atomic_write_text, check_writable_dir


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "f.txt"
    atomic_write_text(path, "old")
    atomic_write_text(path, "new content")
    assert path.read_text() == "new content"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_atomic_write_keeps_old_file_when_the_write_fails(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write_bytes(path, b"good")

    def boom(tmp):
        tmp.write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, boom)
    assert path.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_atomic_write_gives_usual_permissions(tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    atomic_write_text(tmp_path / "f.json", "{}")
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == 0o666 & ~mask


def test_tensor_file_holds_contiguous_cpu_copies_and_unties_shared_storage(tmp_path):
    weight = torch.arange(12.0).reshape(3, 4)
    atomic_write_tensors(tmp_path / "t.safetensors", {"w": weight.t(), "tied": weight, "again": weight},
                         metadata={"format": "x"})
    loaded = load_file(str(tmp_path / "t.safetensors"))
    assert torch.equal(loaded["w"], weight.t()) and torch.equal(loaded["tied"], weight)
    assert torch.equal(loaded["again"], weight)
    with pytest.raises(TypeError, match="tensor 'n' to save is a int"):
        atomic_write_tensors(tmp_path / "bad.safetensors", {"n": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors"]


def test_check_writable_dir_creates_the_folder_and_refuses_a_file(tmp_path):
    check_writable_dir(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir() and not list((tmp_path / "a" / "b").iterdir())
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError):
        check_writable_dir(tmp_path / "file" / "run")


def test_tensor_files_are_byte_identical_whatever_the_metadata_order(tmp_path):
    # safetensors keeps metadata in a hash map whose order changes from call to call
    tensors = {"b": torch.ones(3), "a": torch.arange(4.0)}
    files = []
    for i, metadata in enumerate([{"format": "x", "step": "5", "kind": "k"}, {"step": "5", "kind": "k", "format": "x"}] * 6):
        atomic_write_tensors(tmp_path / f"{i}.safetensors", tensors, metadata=metadata)
        files.append((tmp_path / f"{i}.safetensors").read_bytes())
    assert all(f == files[0] for f in files)
    loaded = load_file(str(tmp_path / "0.safetensors"))
    assert torch.equal(loaded["a"], tensors["a"]) and torch.equal(loaded["b"], tensors["b"])
