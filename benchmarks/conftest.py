"""pytest setup for the benchmark suite (`pytest benchmarks/bench_ops.py --benchmark-only`).

Kept out of the default test run: the repository's pytest testpaths is tests/ only. Makes the
checkout's `isofast` and the benchmark helpers importable without installing.
"""
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
for path in (_HERE, os.path.dirname(_HERE)):
    if path not in sys.path:
        sys.path.insert(0, path)
