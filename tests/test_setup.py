"""setup.py's choice of what to compile: the CUDA kernels on a machine with torch-with-CUDA, nvcc
and a GPU, or when forced with ISOFAST_CUDA=1; never silently when asked and impossible.

The build itself is exercised by CI (`pip install -e .` compiles the CPU kernels; .ci/build_cuda.sh
compiles and links the CUDA ones with ISOFAST_CUDA=1). This pins the decision a CUDA machine's
`pip install .` takes, which no GPU-less machine can run.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch.utils.cpp_extension

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_module():
    spec = importlib.util.spec_from_file_location("isofast_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__: defines the helpers, builds nothing
    return module


def fake_torch(cuda_version: str | None, gpu: bool) -> SimpleNamespace:
    return SimpleNamespace(version=SimpleNamespace(cuda=cuda_version), cuda=SimpleNamespace(is_available=lambda: gpu))


@pytest.mark.parametrize(
    "flag, cuda_version, nvcc, gpu, want",
    [
        ("", "13.0", True, True, (True, "GPU present")),  # a CUDA machine: the default build has the kernels
        ("", "13.0", True, False, (False, "no GPU (set ISOFAST_CUDA=1 to cross-compile)")),
        ("1", "13.0", True, False, (True, "ISOFAST_CUDA=1")),
        ("0", "13.0", True, True, (False, "ISOFAST_CUDA=0")),
        ("", None, True, True, (False, "torch built without CUDA")),
        ("", "13.0", False, True, (False, "nvcc not found")),
    ],
)
def test_cuda_build_decision(setup_module, monkeypatch, flag, cuda_version, nvcc, gpu, want):
    monkeypatch.setenv("ISOFAST_CUDA", flag)
    monkeypatch.setattr(torch.utils.cpp_extension, "CUDA_HOME", "/usr/local/cuda" if nvcc else None)
    assert setup_module._want_cuda(fake_torch(cuda_version, gpu)) == want


@pytest.mark.parametrize("cuda_version, nvcc, message", [(None, True, "no CUDA support"), ("13.0", False, "nvcc was not found")])
def test_forced_cuda_build_that_cannot_happen_fails_loudly(setup_module, monkeypatch, cuda_version, nvcc, message):
    monkeypatch.setenv("ISOFAST_CUDA", "1")
    monkeypatch.setattr(torch.utils.cpp_extension, "CUDA_HOME", "/usr/local/cuda" if nvcc else None)
    with pytest.raises(RuntimeError, match=message):
        setup_module._want_cuda(fake_torch(cuda_version, gpu=False))
