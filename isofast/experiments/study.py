"""`isofast toy2d --protocol NAME`: a protocol's lambda sweep with a temperature baseline, evaluated at
several training lengths against named reference sets, on the ensemble engine.

For each dataset, one `isofast.ensemble.EnsembleRun` trains every (lambda, seed) member at once: members
of one seed share the training points, initial weights, data order, timesteps and noise (common random
numbers), so lambda's effect is measured in pairs. At each training length in ``eval_at`` (fractions of
the protocol's steps) every member samples ``n_eval`` points (DDPM, its seed's sampler noise), and at the
last one the lambda = 0 members also sample at each temperature tau of ``temperatures`` (x_T and every
step's noise scaled by tau). PRDC against each reference set gives one row of ``prdc.csv``:

    dataset, lambda, temperature, seed, step, fraction, reference, precision, recall, density, coverage

The tables, paired intervals and figures are `study_report`'s. Resumable: each dataset's ensemble is saved
(atomically) at every evaluation, with the rows so far; ``resume=True`` continues from there. A resume may
also raise ``steps`` (nothing else of the protocol): the study is extended, its members train on from their
last save (Adam with a constant learning rate and no schedule tied to the budget, so an extended run is the
longer run), the evaluations already made are kept at their steps, and the new ``eval_at`` fractions of the
new budget that lie ahead are added. A new fraction that lies before the last save is evaluated by a replay:
the members are trained again from step 0 to it (the same data, seeds and noise streams: the replay retraces
the saved run, which is checked on the loss log the save holds) and discarded.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..distributed import pick_device
from ..io import atomic_write, atomic_write_text, refuse_changed_settings, resumed_record, writable_output_dir
from .protocols import PROTOCOLS, Protocol, member_data, reference_points
from .toy2d import METRICS

if TYPE_CHECKING:
    from ..ensemble import EnsembleRun

__all__ = ["PRDC_COLUMNS", "StudyConfig", "run_study"]

PRDC_COLUMNS = ("dataset", "lambda", "temperature", "seed", "step", "fraction", "reference",
                "precision", "recall", "density", "coverage")


@dataclass(frozen=True)
class StudyConfig:
    """out: output folder. protocol: the resolved `Protocol`. datasets, lambdas (>= 0, must hold 0: the
    pairs' baseline), seeds. temperatures: taus (> 0) for the lambda = 0 members (1 is always sampled).
    eval_at: training lengths as fractions in (0, 1] of protocol.steps (1 is always evaluated)."""

    out: str
    protocol: Protocol
    datasets: tuple[str, ...]
    lambdas: tuple[float, ...] = (0.0, 0.1, 0.3)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    temperatures: tuple[float, ...] = (1.0,)
    eval_at: tuple[float, ...] = (1.0,)
    device: str = "auto"
    backend: str | None = None
    progress: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", str(self.out))
        for name in ("datasets", "lambdas", "seeds", "temperatures", "eval_at"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "temperatures", tuple(sorted({1.0, *map(float, self.temperatures)}, reverse=True)))
        object.__setattr__(self, "eval_at", tuple(sorted({1.0, *map(float, self.eval_at)})))

    def validate(self) -> None:
        from ..data.toy2d import DATASETS

        self.protocol.validate()
        if not self.datasets or any(d not in DATASETS for d in self.datasets) or len(set(self.datasets)) != len(
                self.datasets):
            raise ValueError(f"--datasets must name distinct datasets of {', '.join(DATASETS)}, "
                             f"got {list(self.datasets)}")
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf
               for v in self.lambdas) or len(set(self.lambdas)) != len(self.lambdas):
            raise ValueError(f"--lambdas must be distinct finite floats >= 0, got {list(self.lambdas)}")
        if 0.0 not in self.lambdas:
            raise ValueError(f"--lambdas must include 0 (plain DDPM, the baseline of every pair), "
                             f"got {list(self.lambdas)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or any(
                isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.seeds):
            raise ValueError(f"--seeds must be distinct ints >= 0, got {list(self.seeds)}")
        if any(not (0 < t < math.inf) for t in self.temperatures):
            raise ValueError(f"--temperatures must be finite floats > 0, got {list(self.temperatures)}")
        if any(not (0 < f <= 1) for f in self.eval_at):
            raise ValueError(f"--eval-at must be fractions in (0, 1], got {list(self.eval_at)}")

    def eval_steps(self) -> list[int]:
        """The optimizer steps at which the members are evaluated (distinct, >= 1)."""
        return sorted({max(1, round(f * self.protocol.steps)) for f in self.eval_at})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["protocol"] = dataclasses.asdict(self.protocol)
        return d


def study_config(protocol: str, out: str, datasets: Sequence[str], **overrides) -> StudyConfig:
    """A `StudyConfig` for the named protocol; ``overrides`` hold protocol fields and StudyConfig fields
    (None: the protocol's or the default)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"--protocol: unknown protocol {protocol!r}; valid names: {', '.join(PROTOCOLS)}")
    study_fields = {f.name for f in dataclasses.fields(StudyConfig)}
    own = {k: v for k, v in overrides.items() if k in study_fields and v is not None}
    proto = PROTOCOLS[protocol].with_overrides(**{k: v for k, v in overrides.items() if k not in study_fields})
    return StudyConfig(out=out, protocol=proto, datasets=tuple(datasets), **own)


def _members(cfg: StudyConfig) -> list[tuple[float, int]]:
    return [(float(lam), seed) for seed in cfg.seeds for lam in cfg.lambdas]


def _evaluate(cfg: StudyConfig, dataset: str, run, step: int, data: dict, log: Callable[[str], None]) -> list[dict]:
    """PRDC rows of every member at this step (and the temperature baseline at the last step)."""
    from ..ensemble import ensemble_ddpm_sample
    from ..metrics.prdc import PRDCReference

    p, members = cfg.protocol, _members(cfg)
    last = step == cfg.eval_steps()[-1]
    rows = []
    references: dict[tuple, PRDCReference] = {}  # per (seed, reference) set: its radii once for every lambda, tau
    for tau in cfg.temperatures if last else (1.0,):
        idx = list(range(len(members))) if tau == 1.0 else [i for i, (lam, _) in enumerate(members) if lam == 0]
        model = run.ema_model if len(idx) == len(members) else run.ema_model.subset(idx)
        t0 = time.perf_counter()
        samples = ensemble_ddpm_sample(model, p.n_eval, run.schedule, [members[i][1] for i in idx],
                                       backend=cfg.backend, progress=cfg.progress, temperature=tau).float().cpu()
        for j, i in enumerate(idx):
            lam, seed = members[i]
            finite = bool(torch.isfinite(samples[j]).all())
            for ref in p.references:
                if (seed, ref) not in references:
                    references[seed, ref] = PRDCReference(data["refs"][(seed, ref)], k=p.k)
                metrics = references[seed, ref].score(samples[j]) if finite else dict.fromkeys(METRICS, math.nan)
                rows.append({"dataset": dataset, "lambda": lam, "temperature": tau, "seed": seed, "step": step,
                             "fraction": step / p.steps, "reference": ref, **{m: float(metrics[m]) for m in METRICS}})
        log(f"  {dataset} step {step}: sampled {len(idx)} members at tau={tau:g} "
            f"({time.perf_counter() - t0:.0f} s with PRDC)")
    return rows


def _save_state(folder: Path, run, rows: list[dict]) -> None:
    state = run.state_dict()
    atomic_write(folder / "ensemble.pt", lambda tmp: torch.save(state, tmp))
    atomic_write_text(folder / "rows.json", json.dumps(rows) + "\n")  # after the state: rows never run ahead


def run_dataset(cfg: StudyConfig, dataset: str, resume: bool, log: Callable[[str], None]) -> list[dict]:
    """Train, evaluate and save one dataset's members; returns its PRDC rows."""
    from ..ensemble import EnsembleRun

    p, folder = cfg.protocol, Path(cfg.out) / "runs" / dataset
    folder.mkdir(parents=True, exist_ok=True)
    final = cfg.eval_steps()[-1]
    done = folder / "done.json"
    if resume and done.exists() and json.loads(done.read_text())["step"] == final:
        rows = json.loads((folder / "rows.json").read_text())
        if {r["step"] for r in rows} >= set(cfg.eval_steps()):
            return rows
    members = _members(cfg)
    data: dict = {"train": {}, "refs": {}}
    for seed in cfg.seeds:
        train, test = member_data(p, dataset, seed)
        data["train"][seed] = train
        for ref in p.references:
            data["refs"][(seed, ref)] = reference_points(p, ref, dataset, seed, train, test)

    def new_run(log_every: int | None = None) -> EnsembleRun:  # the members at step 0 (a replay builds a second)
        config = p.train_config(str(folder), cfg.backend)
        if log_every is not None:
            config = dataclasses.replace(config, log_every=log_every)
        return EnsembleRun([data["train"][s] for _, s in members], [s for _, s in members],
                           [lam for lam, _ in members], config, pick_device(cfg.device), model=p.model)

    run = new_run()
    rows = []
    if resume and (folder / "ensemble.pt").exists():
        run.load_state_dict(torch.load(folder / "ensemble.pt", weights_only=False))
        rows = [{**r, "fraction": r["step"] / p.steps} for r in json.loads((folder / "rows.json").read_text())]
        log(f"  {dataset}: resumed at step {run.step}")
    earlier = [s for s in cfg.eval_steps() if s < run.step and not any(r["step"] == s for r in rows)]
    if earlier:  # new fractions before the resumed save: replay the members from step 0 to them
        rows = sorted(rows + _replay(cfg, dataset, new_run, run, earlier, data, log), key=lambda r: r["step"])
        _save_state(folder, run, rows)
    for step in cfg.eval_steps():
        if any(r["step"] == step for r in rows):
            continue
        t0 = time.perf_counter()
        run.fit(step, progress=cfg.progress)
        log(f"  {dataset}: trained {len(members)} members to step {step} ({time.perf_counter() - t0:.0f} s)")
        rows += _evaluate(cfg, dataset, run, step, data, log)
        _save_state(folder, run, rows)
    _write_losses(folder / "losses.csv", run, members)
    atomic_write_text(folder / "done.json", json.dumps({"step": run.step}) + "\n")
    return rows


def _replay(cfg: StudyConfig, dataset: str, new_run: Callable[[int | None], EnsembleRun], saved: EnsembleRun,
            steps: list[int], data: dict, log: Callable[[str], None]) -> list[dict]:
    """Train a fresh run (``new_run(log_every)``) from step 0, evaluating it at ``steps`` (all before
    ``saved.step``). Its loss log must equal the saved run's where both log the same windows, or nothing it
    measured is kept."""
    log(f"  {dataset}: steps {steps} lie before the resumed step {saved.step}: replaying the members from step 0")
    # log as the saved run did before any extension changed its interval (steps // 200 of the first budget)
    every = saved.loss_log[0][0] if saved.loss_log else None  # None: the protocol's interval
    replay = new_run(every)
    first_budget = []
    for i, (s, v) in enumerate(saved.loss_log):
        if s != (i + 1) * every:
            break
        first_budget.append((s, list(v)))
    checked_until = first_budget[-1][0] if first_budget else 0
    rows = []
    for step in steps:
        t0 = time.perf_counter()
        replay.fit(step, progress=cfg.progress)
        log(f"  {dataset}: replayed {len(_members(cfg))} members to step {step} ({time.perf_counter() - t0:.0f} s)")
        mine = [(s, list(v)) for s, v in replay.loss_log if s <= checked_until]
        if mine != [e for e in first_budget if e[0] <= step]:
            raise ValueError(f"{dataset}: the replay to step {step} did not retrace the saved run (their loss logs "
                             "differ): replay with the --threads, --device and build the study was trained with")
        rows += _evaluate(cfg, dataset, replay, step, data, log)
    return rows


def _write_losses(path: Path, run, members: list[tuple[float, int]]) -> None:
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(["step"] + [f"lambda_{lam:g}_seed_{s}" for lam, s in members])
    for step, losses in run.loss_log:
        w.writerow([step] + [f"{v:.6g}" for v in losses])
    atomic_write_text(path, out.getvalue())


def prepare_study(cfg: StudyConfig, resume: bool) -> tuple[Path, dict | None]:
    """Validate ``cfg`` and the output folder before any training (as `toy2d.prepare_output`); returns the
    folder and the study.json of the study resumed (None: a new study)."""
    cfg.validate()
    out = writable_output_dir(cfg.out)
    record = resumed_record(out, "study.json", resume, "a study")
    if record is not None:
        old = record["protocol"]
        refuse_changed_settings(out, "study.json", old, cfg.to_dict()["protocol"], ignore=("steps",),
                                hint="only --steps may change on --resume: raising it extends the study")
        if cfg.protocol.steps < old["steps"]:
            raise ValueError(f"--steps {cfg.protocol.steps}: cannot shorten {str(out)!r}, trained for {old['steps']} "
                             "steps (a resume may only extend a study: pass --steps >= its steps)")
    return out, record


def run_study(cfg: StudyConfig, resume: bool = False, log: Callable[[str], None] | None = None) -> list[dict]:
    """Run every dataset of ``cfg``, write prdc.csv and the report; returns the PRDC rows."""
    from .study_report import write_report

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out, old = prepare_study(cfg, resume)
    record = cfg.to_dict()
    if old is not None:  # an extension keeps the budgets it grew from
        earlier = old.get("extended_from_steps", []) + [old["protocol"]["steps"]]
        if earlier[-1] != cfg.protocol.steps:
            record["extended_from_steps"] = earlier
            log(f"isofast toy2d: extending the study from {earlier[-1]} to {cfg.protocol.steps} steps")
        elif "extended_from_steps" in old:
            record["extended_from_steps"] = old["extended_from_steps"]
    # every invocation's wall time: a resume that finds the work done must not report the study as taking 0 min
    # (None: an earlier invocation of isofast before this record, not timed)
    earlier = (old.get("invocation_wall_s", [None]) if old is not None else [])
    atomic_write_text(out / "study.json", json.dumps(record, indent=1) + "\n")
    wall0 = time.perf_counter()
    rows: list[dict] = []
    for dataset in cfg.datasets:
        log(f"isofast toy2d: protocol {cfg.protocol.name}, {dataset}: {len(_members(cfg))} members, "
            f"{cfg.protocol.steps} steps, evaluated at steps {cfg.eval_steps()}")
        rows += run_dataset(cfg, dataset, resume, log)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=PRDC_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "prdc.csv", buf.getvalue())
    record["invocation_wall_s"] = [*earlier, time.perf_counter() - wall0]
    atomic_write_text(out / "study.json", json.dumps(record, indent=1) + "\n")
    write_report(out, cfg, rows, wall_s=record["invocation_wall_s"])
    return rows
