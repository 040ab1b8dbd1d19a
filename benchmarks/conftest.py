"""pytest setup for the benchmark suite (`pytest benchmarks/bench_ops.py --benchmark-only`).

Kept out of the default test run: the repository's pytest testpaths is tests/ only. Makes the
checkout's `isofast` and the benchmark helpers importable without installing.
"""
import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
# The installed isofast (with its compiled extension) wins over the checkout's sources.
if importlib.util.find_spec("isofast") is None:
    sys.path.insert(1, os.path.dirname(_HERE))


def pytest_addoption(parser):
    parser.addoption("--bench-threads", type=int, default=None,
                     help="torch.set_num_threads for the benchmarks (use 1 on a machine shared with other jobs)")


def pytest_configure(config):
    threads = config.getoption("--bench-threads", default=None)
    if threads:
        import torch

        torch.set_num_threads(threads)
