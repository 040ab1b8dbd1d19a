"""DDPM vs Iso-Diffusion on the 2D datasets of the paper: a lambda sweep measured by PRDC.

For each dataset d, seed s and penalty weight lambda (lambda = 0 is plain DDPM), one run:

    x0      = make_dataset(d, n_train, seed=s)                     the training set
    model   = TimeMLP() built right after torch.manual_seed(s)      same init for every lambda
    train     Trainer(model, x0, TrainConfig(steps, batch_size, lr, iso_lambda=lambda, seed=s, T, ema_decay))
    samples = ddpm_sample(ema_model, (n_eval, 2), sched, generator=Generator().manual_seed(s))
    real    = make_dataset(d, n_eval, seed=REAL_SEED_OFFSET + s)   fresh real points, another seed
    metrics = prdc(real, samples, k)                                precision, recall, density, coverage

Every lambda of a (dataset, seed) shares the initial weights, the data order, the timesteps and noise
of training, and the sampler's x_T and step noise (common random numbers), so the differences
between lambdas are the penalty's, not the luck of the draw.

Artefacts written to ``out`` (the tables and figures by `isofast.experiments.toy2d_report`):

* ``results.md``, ``results.csv``: mean and std over seeds per (dataset, lambda) of the four metrics;
* ``runs.csv``: one row per run (metrics, wall and CPU seconds of training and sampling);
* ``samples_grid.png``: real vs generated scatter plots, one row per dataset, one column per lambda
  (first seed);
* ``isotropy_<dataset>.png``: the measured isotropy of the forward process on the training data
  against its theoretical curve 1 + (iso_0 - 1) ab_t (`isofast.metrics.isotropy`);
* ``sweep.json``: the configuration; ``runs/<dataset>/lambda_<l>/seed_<s>/``: each run's trainer
  folder (config, metrics.csv, checkpoints) plus ``samples.npy`` and ``result.json``.

A sweep that stopped can be continued with ``resume=True`` (``--resume``): finished runs are read back,
an interrupted one continues from its last checkpoint.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..io import atomic_write_bytes, atomic_write_text, refuse_changed_settings, writable_output_dir
from ..schedule_names import SCHEDULES
from ..train_config import TrainConfig

PAPER_DATASETS = ("swiss_roll", "moon_scatter", "moon_circles", "central_banana")
DEFAULT_LAMBDAS = (0.0, 0.01, 0.05, 0.1, 0.2, 0.3)
METRICS = ("precision", "recall", "density", "coverage")
REAL_SEED_OFFSET = 1_000_003  # the evaluation set's data seed is this + the run seed: never a training set

# Presets: the paper's protocol, a default that runs the four-dataset sweep in about 5 CPU-minutes (ensemble engine)
# (measured on a 2-core VM, with the load: see the README), and a tiny smoke configuration for tests.
PRESETS: dict[str, dict] = {
    "paper": dict(steps=1000 * 10_000 // 64, batch_size=64, seeds=(0, 1, 2)),  # 1000 epochs of 10k points
    "default": dict(steps=3000, batch_size=512, seeds=(0,)),
    # quick: a smoke test. The cosine schedule is made for any T (ab_T ~ 0); the linear one's betas are made
    # for T = 1000 and at T = 50 stop at ab_T = 0.6, so x_T would never reach noise.
    "quick": dict(datasets=("swiss_roll", "moon_scatter"), lambdas=(0.0, 0.3), seeds=(0,), steps=20, batch_size=64,
                  n_train=500, n_eval=500, T=50, schedule="cosine"),
}


@dataclass(frozen=True)
class SweepConfig:
    """One sweep: which runs, how each trains and how it is measured.

    out: output folder. datasets: names of `isofast.data.toy2d.DATASETS`. lambdas: penalty weights >= 0.
    seeds: run seeds >= 0. steps, batch_size, lr: Adam training of each run (T steps of ``schedule``).
    n_train: training points; n_eval: samples drawn and fresh real points compared (PRDC with ``k``).
    ema_decay: EMA of the weights (the samples come from the EMA model). device: "auto", "cpu", "cuda", ...
    backend: isofast op backend (None: auto). preset: the preset's name (recorded only).
    progress: tqdm bars (only on a terminal).
    """

    out: str
    datasets: tuple[str, ...] = PAPER_DATASETS
    lambdas: tuple[float, ...] = DEFAULT_LAMBDAS
    seeds: tuple[int, ...] = (0,)
    steps: int = PRESETS["default"]["steps"]
    batch_size: int = PRESETS["default"]["batch_size"]
    # Each run is a `TrainConfig`: where no preset says otherwise, it trains with the trainer's defaults.
    lr: float = TrainConfig.lr
    T: int = TrainConfig.T
    schedule: str = TrainConfig.schedule
    n_train: int = 10_000
    n_eval: int = 10_000
    k: int = 5
    ema_decay: float = TrainConfig.ema_decay
    device: str = TrainConfig.device
    backend: str | None = TrainConfig.backend
    preset: str = "default"
    progress: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", str(self.out))
        for name in ("datasets", "lambdas", "seeds"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                raise TypeError(f"{name} must be a sequence, got {type(value).__name__}")
            object.__setattr__(self, name, tuple(value))

    def validate(self) -> None:
        """Raise ValueError/TypeError naming the first bad field (no file system access)."""
        from ..data.toy2d import DATASETS

        if not self.datasets:
            raise ValueError("datasets must name at least one dataset")
        for name in self.datasets:
            if name not in DATASETS:
                raise ValueError(f"unknown dataset name {name!r}; valid names: {', '.join(DATASETS)}")
        if len(set(self.datasets)) != len(self.datasets):
            raise ValueError(f"datasets must not repeat a name, got {list(self.datasets)}")
        if not self.lambdas:
            raise ValueError("lambdas must hold at least one value")
        for lam in self.lambdas:
            if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
                raise ValueError(f"lambdas must be finite floats >= 0, got {lam!r}")
        if len({float(lam) for lam in self.lambdas}) != len(self.lambdas):
            raise ValueError(f"lambdas must not repeat a value, got {list(self.lambdas)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and at least one, got {list(self.seeds)}")
        for s in self.seeds:
            if isinstance(s, bool) or not isinstance(s, int) or s < 0:
                raise ValueError(f"seeds must be ints >= 0, got {s!r}")
        for name, low in (("steps", 1), ("batch_size", 1), ("T", 2), ("k", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
        for name in ("n_train", "n_eval"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < self.k + 1:
                raise ValueError(f"{name} must be an int >= k + 1 = {self.k + 1}, got {v!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite float > 0, got {self.lr!r}")
        if not (isinstance(self.ema_decay, (int, float)) and 0 <= self.ema_decay < 1):
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def config_from_preset(preset: str = "default", quick: bool = False, **overrides) -> SweepConfig:
    """A `SweepConfig`: the preset's values, then the quick preset's if ``quick``, then non-None overrides."""
    if preset not in ("default", "paper"):
        raise ValueError(f"preset must be 'default' or 'paper', got {preset!r}")
    values: dict = dict(PRESETS[preset], preset=preset)
    if quick:
        values.update(PRESETS["quick"], preset=f"{preset}+quick")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return SweepConfig(**values)


# ----- one run ------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    """Metrics and timings of one (dataset, lambda, seed) run; ``samples`` (n_eval, 2) float32."""

    dataset: str
    iso_lambda: float
    seed: int
    precision: float
    recall: float
    density: float
    coverage: float
    train_wall_s: float
    train_cpu_s: float
    sample_wall_s: float
    sample_cpu_s: float
    samples: np.ndarray = field(repr=False)

    def row(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "samples"}


def run_dir(cfg: SweepConfig, dataset: str, iso_lambda: float, seed: int) -> Path:
    return Path(cfg.out) / "runs" / dataset / f"lambda_{iso_lambda:g}" / f"seed_{seed}"


def train_and_evaluate(cfg: SweepConfig, dataset: str, iso_lambda: float, seed: int, resume: bool = False) -> RunResult:
    """Train one model, sample ``n_eval`` points from its EMA weights, and measure PRDC against fresh real points."""
    from ..data.toy2d import make_dataset
    from ..metrics.prdc import prdc
    from ..models.mlp import TimeMLP
    from ..sampling import ddpm_sample
    from ..train import Trainer

    folder = run_dir(cfg, dataset, iso_lambda, seed)
    data = make_dataset(dataset, cfg.n_train, seed=seed)
    torch.manual_seed(seed)
    model = TimeMLP()
    train_cfg = TrainConfig(
        out_dir=str(folder), steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, iso_lambda=float(iso_lambda),
        seed=seed, T=cfg.T, schedule=cfg.schedule, ema_decay=cfg.ema_decay, device=cfg.device, backend=cfg.backend,
        progress=cfg.progress, tensorboard=False, log_every=min(100, cfg.steps),
        ckpt_every=min(cfg.steps, 10_000), keep_checkpoints=1)
    wall, cpu = time.perf_counter(), time.process_time()
    trainer = Trainer(model, data, train_cfg)
    try:
        trainer.fit(resume=resume)
    finally:
        trainer.close()
    train_wall, train_cpu = time.perf_counter() - wall, time.process_time() - cpu

    wall, cpu = time.perf_counter(), time.process_time()
    ema = trainer.ema_model.eval()
    samples = ddpm_sample(ema, (cfg.n_eval, 2), trainer.schedule, generator=torch.Generator().manual_seed(seed),
                          device=trainer.device, progress=cfg.progress, backend=cfg.backend)
    samples = samples.float().cpu()
    sample_wall, sample_cpu = time.perf_counter() - wall, time.process_time() - cpu

    real = make_dataset(dataset, cfg.n_eval, seed=REAL_SEED_OFFSET + seed)
    if torch.isfinite(samples).all():
        metrics = prdc(real, samples, k=cfg.k)
    else:  # a diverged model: record it in the table rather than stop the whole sweep
        print(f"isofast toy2d: warning: {dataset} lambda={iso_lambda:g} seed={seed} produced non-finite samples; "
              "its metrics are NaN", file=sys.stderr)
        metrics = dict.fromkeys(METRICS, float("nan"))
    result = RunResult(dataset, float(iso_lambda), seed, *(float(metrics[m]) for m in METRICS),
                       train_wall, train_cpu, sample_wall, sample_cpu, samples.numpy())
    _save_run(folder, result)
    return result


def _save_run(folder: Path, result: RunResult) -> None:
    buffer = io.BytesIO()
    np.save(buffer, result.samples)
    atomic_write_bytes(folder / "samples.npy", buffer.getvalue())
    # result.json last: its presence marks a finished run (see `_load_run`)
    atomic_write_text(folder / "result.json", json.dumps(result.row(), indent=1) + "\n")


def _load_run(folder: Path) -> RunResult | None:
    try:
        row = json.loads((folder / "result.json").read_text())
        samples = np.load(folder / "samples.npy")
    except FileNotFoundError:
        return None
    return RunResult(**row, samples=samples)


# ----- the sweep ----------------------------------------------------------------------------------------
def prepare_output(cfg: SweepConfig, resume: bool) -> Path:
    """Validate ``cfg`` and make sure ``cfg.out`` is a writable folder, before any training.

    Raises ValueError/TypeError for a bad configuration, PermissionError when the folder cannot be
    created or written, FileExistsError when it holds runs of a sweep and ``resume`` is False, or
    ValueError when resuming a sweep whose recorded training settings differ.
    """
    cfg.validate()
    out = writable_output_dir(cfg.out)
    recorded = out / "sweep.json"
    existing = [run_dir(cfg, d, lam, s) for d in cfg.datasets for lam in cfg.lambdas for s in cfg.seeds]
    started = [p for p in existing if (p / "checkpoints").exists() or (p / "result.json").exists()]
    if started and not resume:
        raise FileExistsError(f"output folder {str(out)!r} already holds runs of a sweep (e.g. {started[0]}): "
                              "pass --resume to continue it, or choose another --out")
    if resume and recorded.exists():
        keys = ("steps", "batch_size", "lr", "T", "schedule", "n_train", "n_eval", "k", "ema_decay")
        refuse_changed_settings(out, "sweep.json", json.loads(recorded.read_text()),
                                {k: getattr(cfg, k) for k in keys},
                                recorded_defaults={"schedule": "linear"})  # sweeps recorded before the field
    return out


def _load_average() -> list[float] | None:
    """The 1, 5 and 15-minute load averages (None where the OS has none)."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def _cpu_seconds() -> float:
    """CPU time (user + system) of this process and of its finished child processes (the workers)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _run_in_worker(cfg: SweepConfig, dataset: str, iso_lambda: float, seed: int, resume: bool) -> RunResult:
    # Each worker process trains its own run; the TTY (and so any progress bar) belongs to the parent.
    return train_and_evaluate(dataclasses.replace(cfg, progress=False), dataset, iso_lambda, seed, resume)


def run_sweep(cfg: SweepConfig, resume: bool = False, log: Callable[[str], None] | None = None,
              jobs: int = 1, engine: str = "single") -> list[dict]:
    """Run every (dataset, lambda, seed) of ``cfg`` and write the artefacts; returns the summary rows.

    jobs: runs trained at once, each in its own process with torch.get_num_threads() // jobs threads
    (at least 1). Small MLPs use cores better as parallel single-threaded runs than as one multi-threaded
    run; the results do not depend on ``jobs``. engine "ensemble": all pending runs as one ensemble
    (`toy2d_ensemble`; ``jobs`` is not used).
    """
    from .toy2d_report import plot_isotropy, plot_samples_grid, summarize, untimed_work, write_tables

    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be an int >= 1, got {jobs!r}")
    if engine not in ("single", "ensemble"):
        raise ValueError(f"engine must be 'single' or 'ensemble', got {engine!r}")
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out = prepare_output(cfg, resume)
    atomic_write_text(out / "sweep.json", json.dumps(cfg.to_dict(), indent=1) + "\n")
    runs = [(d, lam, s) for d in cfg.datasets for s in cfg.seeds for lam in cfg.lambdas]
    wall0, cpu0, load_at_start = time.perf_counter(), _cpu_seconds(), _load_average()
    threads = max(1, torch.get_num_threads() // jobs)
    results: dict[tuple, RunResult] = {}
    finished_earlier = 0
    ensemble_timing: dict = {}  # where a resumed ensemble continued its training (toy2d_ensemble)

    def report(key: tuple, result: RunResult, earlier: bool) -> None:
        results[key] = result
        dataset, lam, seed = key
        log(f"[{len(results)}/{len(runs)}] {dataset} lambda={lam:g} seed={seed}: "
            + ("(finished earlier) " if earlier else
               f"train {result.train_wall_s:.1f} s, sample {result.sample_wall_s:.1f} s; ")
            + " ".join(f"{m[0].upper()}={getattr(result, m):.3f}" for m in METRICS))

    todo = []
    for key in runs:
        done = _load_run(run_dir(cfg, *key)) if resume else None
        if done is not None:
            finished_earlier += 1
            report(key, done, True)
        else:
            todo.append(key)
    if engine == "ensemble" and todo:
        from .toy2d_ensemble import train_and_evaluate_all

        for key, result in zip(todo, train_and_evaluate_all(cfg, todo, resume=resume, timing=ensemble_timing),
                               strict=True):
            report(key, result, False)
    elif jobs == 1:
        for key in todo:
            report(key, train_and_evaluate(cfg, *key, resume=resume), False)
    elif todo:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        # spawn: a fresh interpreter per worker (fork after torch's thread pools have started is unsafe)
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
                                 initargs=(threads,)) as pool:
            futures = {pool.submit(_run_in_worker, cfg, *key, resume): key for key in todo}
            for future in as_completed(futures):
                report(futures[future], future.result(), False)
    ordered = [results[key] for key in runs]
    elapsed = {"wall_s": time.perf_counter() - wall0, "cpu_s": _cpu_seconds() - cpu0,
               # the ensemble engine trains every run in this one process, whatever --jobs says
               "engine": engine, "jobs": 1 if engine == "ensemble" else jobs,
               "torch_threads": threads if jobs > 1 and engine != "ensemble" else torch.get_num_threads(),
               "cpu_count": os.cpu_count(), "runs": len(runs), "runs_finished_earlier": finished_earlier,
               # a wall time means little without the machine's load (other jobs share its cores)
               "load_average_at_start": load_at_start, "load_average_at_end": _load_average(), **ensemble_timing}

    summary = summarize(ordered, cfg)
    write_tables(out, cfg, ordered, summary, elapsed)
    plot_samples_grid(out / "samples_grid.png", cfg, ordered)
    for dataset in cfg.datasets:
        plot_isotropy(out / f"isotropy_{dataset}.png", cfg, dataset)
    log(f"isofast toy2d: {len(runs)} runs in {elapsed['wall_s'] / 60:.1f} min wall, "
        f"{elapsed['cpu_s'] / 60:.1f} min CPU{untimed_work(elapsed)}; results in {out}")
    return summary
