"""`isofast toy2d --engine ensemble`: every pending run of a sweep trained and sampled as one ensemble.

Each (dataset, lambda, seed) run is a member of one `isofast.ensemble.EnsembleRun` (exactly the single
engine's run of that seed, lambda and dataset: `tests/test_ensemble.py`), sampled with
`ensemble_ddpm_sample` from its EMA weights and scored with PRDC as `toy2d.train_and_evaluate` does; each
run's folder gets the same ``samples.npy`` and ``result.json``. The members' wall and CPU times are the
ensemble's, divided evenly among them. A resumed sweep reuses finished runs; members that had not
finished start again from step 0 (the ensemble keeps no checkpoints yet).
"""
from __future__ import annotations

import sys
import time

import torch

from ..train_config import TrainConfig
from .toy2d import METRICS, REAL_SEED_OFFSET, RunResult, SweepConfig, _save_run, run_dir


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def train_and_evaluate_all(cfg: SweepConfig, runs: list[tuple[str, float, int]]) -> list[RunResult]:
    """Train every (dataset, lambda, seed) of ``runs`` as one ensemble; the results in that order."""
    from ..data.toy2d import make_dataset
    from ..ensemble import EnsembleRun, ensemble_ddpm_sample
    from ..metrics.prdc import prdc

    seeds = [seed for _, _, seed in runs]
    data = [make_dataset(dataset, cfg.n_train, seed=seed) for dataset, _, seed in runs]
    train_cfg = TrainConfig(out_dir=cfg.out, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, T=cfg.T,
                            schedule=cfg.schedule, ema_decay=cfg.ema_decay, backend=cfg.backend, progress=False, tensorboard=False)
    wall, cpu = time.perf_counter(), time.process_time()
    ensemble = EnsembleRun(data, seeds, [lam for _, lam, _ in runs], train_cfg, _device(cfg.device))
    ensemble.fit(progress=cfg.progress)
    train_wall, train_cpu = time.perf_counter() - wall, time.process_time() - cpu

    wall, cpu = time.perf_counter(), time.process_time()
    samples = ensemble_ddpm_sample(ensemble.ema_model, cfg.n_eval, ensemble.schedule, seeds, backend=cfg.backend,
                                   progress=cfg.progress).float().cpu()
    sample_wall, sample_cpu = time.perf_counter() - wall, time.process_time() - cpu

    M, results = len(runs), []
    for m, (dataset, lam, seed) in enumerate(runs):
        real = make_dataset(dataset, cfg.n_eval, seed=REAL_SEED_OFFSET + seed)
        if torch.isfinite(samples[m]).all():
            metrics = prdc(real, samples[m], k=cfg.k)
        else:  # a diverged member: record it in the table rather than stop the whole sweep
            print(f"isofast toy2d: warning: {dataset} lambda={lam:g} seed={seed} produced non-finite samples; "
                  "its metrics are NaN", file=sys.stderr)
            metrics = dict.fromkeys(METRICS, float("nan"))
        result = RunResult(dataset, float(lam), seed, *(float(metrics[k]) for k in METRICS), train_wall / M,
                           train_cpu / M, sample_wall / M, sample_cpu / M, samples[m].numpy())
        folder = run_dir(cfg, dataset, lam, seed)
        folder.mkdir(parents=True, exist_ok=True)
        _save_run(folder, result)
        results.append(result)
    return results
