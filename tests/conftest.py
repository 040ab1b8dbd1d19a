"""Test setup: Triton runs under its CPU interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton (and so isofast) is imported.
"""
import os

try:  # a machine with a GPU runs Triton for real; everywhere else, interpret
    import subprocess

    _has_gpu = subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=10).returncode == 0
except Exception:
    _has_gpu = False
if not _has_gpu:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
settings.load_profile("ci")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
