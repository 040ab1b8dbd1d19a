"""retain_freed_memory: buffers freed and allocated again every step stop costing page faults (glibc)."""
from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from isofast.malloc_policy import retain_freed_memory

# Allocate, touch and free a 40 MB buffer 20 times; print the page faults of the last 10 rounds. (glibc's
# adaptive mmap threshold stops at 32 MB: by default every round maps fresh pages.)
_PROBE = """
import resource, sys, torch
from isofast.malloc_policy import retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory()
def rounds(n):
    for _ in range(n):
        torch.ones(10 << 20)
rounds(10)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
rounds(10)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(platform.system() != "Linux" or not platform.libc_ver()[0] == "glibc", reason="glibc only")
def test_freed_buffers_are_kept_instead_of_faulted_back():
    # glibc's default serves 40 MB with mmap: ~10,000 faults per round; kept in the heap: (almost) none
    assert _faults("default") > 10 * 5000
    assert _faults("retain") < 100


def test_other_platforms_report_that_nothing_applied(monkeypatch):
    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    assert retain_freed_memory() is False
