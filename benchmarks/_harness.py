"""Measurement primitives of the benchmarks: timing, peak memory, copy bandwidth, machine facts.

Timing protocol (`measure_interleaved`): every variant of a row is warmed up, one call is timed
to pick how many calls make one sample (so a sample lasts at least ``min_sample_s``), then the
variants are sampled *round-robin*, ``repeat`` samples each, so a slow phase of a shared machine
hits every variant alike instead of one. Each call gets input set ``k mod n_inputs`` (the sets
are rotated so caches do not flatter). CUDA: one pair of CUDA events per sample; elsewhere
``time.perf_counter`` around the sample. Reported: per-call median, quartiles, min.

Peak memory (`peak_bytes`): bytes newly allocated at the peak of one call, inputs excluded.
CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was allocated before.
CPU: the growth of the peak resident set (VmHWM, reset through /proc/self/clear_refs) over the
resident set before the call, with glibc's mmap threshold pinned at 64 KiB (`pin_mmap_threshold`)
so every tensor of 64 KiB or more is its own mapping, touched when written and unmapped when freed,
and ``malloc_trim`` before each measurement so freed heap pages are not silently reused;
smaller allocations are not resolved. Pinning the threshold changes allocation costs, so the
benchmark measures memory only after all timings are done.
"""
from __future__ import annotations

import ctypes
import datetime as _dt
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from isofast.malloc_policy import set_malloc_thresholds

_CPU_PIN_BYTES = 64 * 1024


# ----- timing -------------------------------------------------------------------------------------------
@dataclass
class Timing:
    """Per-call seconds: median, 25th/75th percentiles, min, and the raw samples."""

    median: float
    q25: float
    q75: float
    min: float
    calls_per_sample: int
    samples: list[float] = field(default_factory=list)

    @property
    def spread(self) -> float:
        """Half the interquartile range over the median (0.05 = +-5%); NaN from a single sample."""
        if len(self.samples) < 2 or self.median <= 0:
            return float("nan")
        return (self.q75 - self.q25) / (2 * self.median)

    def to_json(self) -> dict:
        spread = self.spread
        return {**asdict(self), "spread": None if math.isnan(spread) else spread}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quartiles(values: Sequence[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def measure_interleaved(
    fns: Sequence[Callable[[int], object]],
    n_inputs: int,
    device: torch.device,
    *,
    warmup: int,
    repeat: int,
    min_sample_s: float,
    on_sample: Callable[[], None] | None = None,
) -> list[Timing]:
    """Time each ``fn(i)`` (i: input-set index) round-robin; returns one `Timing` per fn.

    ``warmup`` calls each first (compilation, autotuning, allocator), then one timed call sets
    the calls per sample, then ``repeat`` rounds of one sample per fn. ``min_sample_s = 0``
    gives one call per sample (long rows: whole sampling runs).
    """
    counters = [0] * len(fns)
    for j, fn in enumerate(fns):
        for _ in range(warmup):
            fn(counters[j] % n_inputs)
            counters[j] += 1
    synchronize(device)
    numbers = []
    for j, fn in enumerate(fns):
        start = time.perf_counter()
        fn(counters[j] % n_inputs)
        synchronize(device)
        counters[j] += 1
        one = max(time.perf_counter() - start, 1e-7)
        numbers.append(max(1, math.ceil(min_sample_s / one)) if min_sample_s > 0 else 1)
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for j, fn in enumerate(fns):
            samples[j].append(_one_sample(fn, numbers[j], counters[j], n_inputs, device))
            counters[j] += numbers[j]
        if on_sample is not None:
            on_sample()
    out = []
    for number, per_call in zip(numbers, samples, strict=True):
        q25, q75 = _quartiles(per_call)
        out.append(Timing(statistics.median(per_call), q25, q75, min(per_call), number, per_call))
    return out


def _one_sample(fn: Callable[[int], object], number: int, first: int, n_inputs: int, device: torch.device) -> float:
    """Seconds per call over ``number`` back-to-back calls."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for k in range(number):
            fn((first + k) % n_inputs)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / number
    synchronize(device)
    start_s = time.perf_counter()
    for k in range(number):
        fn((first + k) % n_inputs)
    synchronize(device)
    return (time.perf_counter() - start_s) / number


# ----- memory -------------------------------------------------------------------------------------------
def pin_mmap_threshold() -> bool:
    """Pin glibc's mmap threshold (see module docstring); False where glibc is not there."""
    return set_malloc_thresholds(mmap_threshold=_CPU_PIN_BYTES)


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Bytes allocated at the peak of one ``fn()`` beyond what existed before; None if unmeasurable."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        del result
        return torch.cuda.max_memory_allocated(device) - base
    _malloc_trim()  # hand freed heap pages back, or their reuse would not show as growth
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5: reset the peak RSS (VmHWM) to the current RSS
        base = _proc_status_bytes("VmRSS:")
        result = fn()
        peak = _proc_status_bytes("VmHWM:")
        del result
        return max(peak - base, 0)
    except (OSError, KeyError):
        return None


# ----- bandwidth ceiling --------------------------------------------------------------------------------
def copy_bandwidth(device: torch.device, nbytes: int, repeat: int = 10) -> float:
    """Best achieved bytes/s of ``dst.copy_(src)`` on ``nbytes`` buffers (counts read + write).

    The ceiling that "% of copy bandwidth" refers to: the same device, measured in this run.
    """
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    best = math.inf
    for _ in range(repeat):
        seconds = _one_sample(lambda _i: dst.copy_(src), 1, 0, 1, device)
        best = min(best, seconds)
    return 2 * src.numel() * src.element_size() / best


def cache_bytes(device: torch.device) -> int:
    """Size of the last-level cache the input rotation must defeat (L2 on a GPU, LLC on a CPU)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 50 * 2**20))
    for index in (3, 2):
        try:
            with open(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size") as f:
                text = f.read().strip()
            units = {"K": 2**10, "M": 2**20, "G": 2**30}
            return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
        except (OSError, ValueError):
            continue
    return 32 * 2**20


def rotation_count(set_bytes: int, device: torch.device, low: int = 2, high: int = 8) -> int:
    """How many input sets to cycle: enough to cover twice the last-level cache, within [low, high]."""
    if set_bytes <= 0:
        return low
    return max(low, min(high, math.ceil(2 * cache_bytes(device) / set_bytes)))


# ----- correctness --------------------------------------------------------------------------------------
def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol_rel: float) -> None:
    """assert |actual - expected| <= atol_rel * max|expected| + rtol * |expected| elementwise (in float64)."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != reference {tuple(expected.shape)}")
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if not torch.isfinite(a).all():
        raise AssertionError(f"{name}: non-finite values")
    atol = atol_rel * float(e.abs().max()) if e.numel() else 0.0
    err = (a - e).abs()
    bad = err > atol + rtol * e.abs()
    if bad.any():
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements off; max abs error {float(err.max()):.3g} "
            f"(atol {atol:.3g}, rtol {rtol:g})"
        )


# ----- machine ------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def device_name(device: torch.device) -> str:
    """File-name-safe name of the machine's compute device, e.g. ``nvidia-h100-80gb-hbm3`` or ``cpu-...-2c``."""
    if device.type == "cuda":
        raw = torch.cuda.get_device_name(device)
    else:
        raw = f"cpu {_cpu_model()} {cpu_count()}c"
    for junk in ("(R)", "(TM)", "CPU @", "Processor"):
        raw = raw.replace(junk, " ")
    slug = "".join(c if c.isalnum() else "-" for c in raw.lower())
    return "-".join(part for part in slug.split("-") if part)


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:
        return None


def _git_commit() -> str | None:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except Exception:
        return None


def _git_dirty() -> list[str] | None:
    """Modified tracked files of the package and the extension: the run measured them, not the commit."""
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "isofast", "csrc"],
                             cwd=os.path.dirname(here), capture_output=True, text=True, timeout=10)
        return [line[3:] for line in out.stdout.splitlines()]
    except Exception:
        return None


def _extension_built() -> str | None:
    """Build time (UTC) of the compiled extension that was loaded, if any."""
    try:
        from isofast import _C

        stamp = os.path.getmtime(_C.__file__)
        return _dt.datetime.fromtimestamp(stamp, _dt.timezone.utc).isoformat(timespec="seconds")
    except Exception:
        return None


def machine_info(device: torch.device) -> dict:
    """Everything that identifies the run: device, host, versions, date, load."""
    info = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": device_name(device),
        "cpu_model": _cpu_model(),
        "cpu_cores_usable": cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "versions": {m: _version(m) for m in ("torch", "triton", "diffusers", "numpy", "isofast")},
        "git_commit": _git_commit(),
        "git_modified_files": _git_dirty(),
        "isofast_C_built_utc": _extension_built(),
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_bytes=props.total_memory, cuda=torch.version.cuda,
                    gpu_capability=f"{props.major}.{props.minor}")
    return info
