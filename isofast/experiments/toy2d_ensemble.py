"""`isofast toy2d --engine ensemble`: every pending run of a sweep trained and sampled as one ensemble.

Each (dataset, lambda, seed) run is a member of one `isofast.ensemble.EnsembleRun` (exactly the single
engine's run of that seed, lambda and dataset: `tests/test_ensemble.py`), sampled with
`ensemble_ddpm_sample` from its EMA weights and scored with PRDC as `toy2d.train_and_evaluate` does; each
run's folder gets the same ``samples.npy`` and ``result.json``, its ``config.json`` and a ``metrics.csv`` of
its mean training loss per ``log_every`` steps (its weights are in the ensemble's save, not a checkpoint). The members' wall and CPU times are the
ensemble's, divided evenly among them.

Resume: the ensemble is saved atomically to ``out/ensemble_state.pt`` every ``CKPT_EVERY`` steps (with the
list of its runs); a resumed sweep reuses finished runs and continues the unfinished ensemble from its last
save when it holds the same runs (bit for bit: `EnsembleRun.state_dict`), else starts it again.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from ..distributed import pick_device
from ..io import atomic_write, atomic_write_text
from ..malloc_policy import retain_freed_memory
from ..train_config import TrainConfig
from .toy2d import METRICS, REAL_SEED_OFFSET, RunResult, SweepConfig, _save_run, run_dir

CKPT_EVERY = 2000  # steps between saves of the ensemble (a save of 18 members takes ~0.1 s)


def _fit_with_saves(ensemble, runs: list, path: Path, resume: bool, progress: bool) -> int:
    """Train to the config's steps with a save every CKPT_EVERY steps; returns the step it started from (a resumed
    save's, else 0)."""
    key = [list(r) for r in runs]
    if resume and path.exists():
        state = torch.load(path, weights_only=False)
        if state["runs"] == key:
            ensemble.load_state_dict(state["ensemble"])
            print(f"isofast toy2d: resumed the ensemble of {len(runs)} runs at step {ensemble.step}", file=sys.stderr)
    start = ensemble.step
    while ensemble.step < ensemble.config.steps:
        ensemble.fit(min(ensemble.config.steps, (ensemble.step // CKPT_EVERY + 1) * CKPT_EVERY), progress=progress)
        state = {"runs": key, "ensemble": ensemble.state_dict()}
        atomic_write(path, lambda tmp, state=state: torch.save(state, tmp))
    return start


def train_and_evaluate_all(cfg: SweepConfig, runs: list[tuple[str, float, int]], resume: bool = False,
                           timing: dict | None = None) -> list[RunResult]:
    """Train every (dataset, lambda, seed) of ``runs`` as one ensemble; the results in that order. timing: a dict
    that gets ``ensemble_resumed_at_step`` (the step a resumed save continued from, else 0) and
    ``ensemble_steps``: the training this invocation timed is the steps from there on."""
    from ..data.toy2d import make_dataset
    from ..ensemble import EnsembleRun, ensemble_ddpm_sample
    from ..metrics.prdc import PRDCReference

    retain_freed_memory()  # the step's buffers would otherwise be page-faulted back every step
    seeds = [seed for _, _, seed in runs]
    data = [make_dataset(dataset, cfg.n_train, seed=seed) for dataset, _, seed in runs]
    train_cfg = TrainConfig(out_dir=cfg.out, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, T=cfg.T,
                            schedule=cfg.schedule, ema_decay=cfg.ema_decay, backend=cfg.backend, progress=False, tensorboard=False)
    wall, cpu = time.perf_counter(), time.process_time()
    ensemble = EnsembleRun(data, seeds, [lam for _, lam, _ in runs], train_cfg, pick_device(cfg.device))
    resumed_at = _fit_with_saves(ensemble, runs, Path(cfg.out) / "ensemble_state.pt", resume, cfg.progress)
    if timing is not None:
        timing.update(ensemble_resumed_at_step=resumed_at, ensemble_steps=cfg.steps)
    train_wall, train_cpu = time.perf_counter() - wall, time.process_time() - cpu

    wall, cpu = time.perf_counter(), time.process_time()
    samples = ensemble_ddpm_sample(ensemble.ema_model, cfg.n_eval, ensemble.schedule, seeds, backend=cfg.backend,
                                   progress=cfg.progress).float().cpu()
    sample_wall, sample_cpu = time.perf_counter() - wall, time.process_time() - cpu

    M, results = len(runs), []
    references: dict[tuple[str, int], PRDCReference] = {}  # the lambdas of a (dataset, seed) share its real set
    for m, (dataset, lam, seed) in enumerate(runs):
        if (dataset, seed) not in references:
            real = make_dataset(dataset, cfg.n_eval, seed=REAL_SEED_OFFSET + seed)
            references[dataset, seed] = PRDCReference(real, k=cfg.k)
        if torch.isfinite(samples[m]).all():
            metrics = references[dataset, seed].score(samples[m])
        else:  # a diverged member: record it in the table rather than stop the whole sweep
            print(f"isofast toy2d: warning: {dataset} lambda={lam:g} seed={seed} produced non-finite samples; "
                  "its metrics are NaN", file=sys.stderr)
            metrics = dict.fromkeys(METRICS, float("nan"))
        result = RunResult(dataset, float(lam), seed, *(float(metrics[k]) for k in METRICS), train_wall / M,
                           train_cpu / M, sample_wall / M, sample_cpu / M, samples[m].numpy())
        folder = run_dir(cfg, dataset, lam, seed)
        folder.mkdir(parents=True, exist_ok=True)
        # the member's own record, as its single run would leave it (its weights live in the ensemble's save)
        member_cfg = dataclasses.replace(train_cfg, out_dir=str(folder), seed=seed, iso_lambda=float(lam))
        atomic_write_text(folder / "config.json", json.dumps(member_cfg.to_dict(), indent=1) + "\n")
        atomic_write_text(folder / "metrics.csv", "step,loss\n" + "".join(
            f"{step},{losses[m]:.6g}\n" for step, losses in ensemble.loss_log))
        _save_run(folder, result)
        results.append(result)
    return results
