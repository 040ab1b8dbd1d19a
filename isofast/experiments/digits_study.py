"""Images on a CPU: DDPM (lambda = 0) vs Iso-Diffusion (lambda > 0) and the temperature baseline on
scikit-learn's 8x8 digits, paired over seeds::

    python -m isofast.experiments.digits_study --out DIR [--seeds 0 1 2] [--lambdas 0 0.3]
        [--temperatures 1 0.95 0.9 0.85 0.8] [--steps N] [--n-samples N] [--threads 1] [--resume]

The 1797 digits are split once at random (``--test-fraction`` held out, ``--split-seed``). Each arm (lambda,
seed) trains a small UNet (`digits_arm.digits_unet`) with isofast's fused loss, iso_mode "batch", EMA of the
weights (``--ema-decay``; samples come from the EMA model), then samples ``--n-samples`` digits (DDPM
ancestral steps, each step's x0 estimate clamped to [-1, 1] as in DDPM's image sampler unless
``--no-clip-x0``) at tau = 1, and the lambda = 0 arms also at every ``--temperatures`` tau (x_T and every step's
noise scaled by tau). PRDC (k = ``--k``) on the 64 flattened pixels against each reference set
(``--references``): ``test``, the held-out digits, and ``train``, as many training digits (same N, so the k-NN
radii compare).

Written to DIR: ``prdc.csv`` (one row per arm, temperature and reference: dataset, lambda, temperature, seed,
reference, precision, recall, density, coverage, sample_sq_norm (the samples' mean squared norm over the 64
pixels), step), ``summary.md`` and the figures (`digits_report`), ``grids/`` (a sample grid per arm),
``study.json`` (the settings) and ``runs/lambda_<l>_seed_<s>/`` (the trainer's folder and ``result.json``).

``--report-only`` writes summary.md and the figures of a finished study again (after a change to the report).

Resumable: an arm's ``result.json`` is written atomically when it is finished; ``--resume`` reads finished
arms back and continues an unfinished one from its last checkpoint. Seeds and lambdas may be added on resume;
every other setting must match ``study.json``.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..io import atomic_write_text, refuse_changed_settings, resumed_record, writable_output_dir
from ..schedule_names import SCHEDULES
from .digits_arm import REFERENCES

__all__ = ["CSV_COLUMNS", "DigitsConfig", "main", "run_study"]

CSV_COLUMNS = ("dataset", "lambda", "temperature", "seed", "reference", "precision", "recall", "density", "coverage",
               "sample_sq_norm", "step")
# Settings an added seed or lambda does not change: everything else must match study.json on --resume.
_FREE_ON_RESUME = ("out", "seeds", "lambdas", "progress")


@dataclass(frozen=True)
class DigitsConfig:
    """out: output folder. lambdas (>= 0, must hold 0), seeds (ints >= 0), temperatures (> 0; 1 is always
    sampled) for the lambda = 0 arms, references (of `REFERENCES`). Training: steps, batch_size, lr, grad_clip,
    ema_decay, schedule, T; the UNet: base_channels, channel_mult, num_res_blocks. Evaluation: n_samples per
    arm and tau, clip_x0 (clamp each sampler step's x0 estimate to [-1, 1]), k of PRDC; the split:
    test_fraction of the 1797 digits held out, by split_seed. The defaults are sized so that the default
    comparison (6 arms) takes about 20 CPU-minutes on one thread (results/verdict/digits/README.md)."""

    out: str
    lambdas: tuple[float, ...] = (0.0, 0.3)
    seeds: tuple[int, ...] = (0, 1, 2)
    temperatures: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8)
    references: tuple[str, ...] = REFERENCES
    steps: int = 1500
    batch_size: int = 128
    lr: float = 1e-3
    grad_clip: float = 1.0
    ema_decay: float = 0.995
    schedule: str = "cosine"
    T: int = 200
    base_channels: int = 16
    channel_mult: tuple[int, ...] = (1, 2)
    num_res_blocks: int = 1
    n_samples: int = 500
    clip_x0: bool = True
    k: int = 5
    test_fraction: float = 0.2
    split_seed: int = 0
    backend: str | None = None
    progress: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", str(self.out))
        for name in ("lambdas", "seeds", "references", "channel_mult"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        taus = tuple(self.temperatures)
        if all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in taus):
            taus = tuple(sorted({1.0, *map(float, taus)}, reverse=True))
        object.__setattr__(self, "temperatures", taus)

    def validate(self) -> None:
        """Raise ValueError naming the first bad argument."""
        def real(v: object) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        def positive_int(name: str) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be an int >= 1, got {v!r}")

        if not self.lambdas or any(not real(v) or v < 0 for v in self.lambdas) or len(set(self.lambdas)) != len(
                self.lambdas):
            raise ValueError(f"--lambdas must be distinct finite floats >= 0, got {list(self.lambdas)}")
        if 0.0 not in self.lambdas:
            raise ValueError(f"--lambdas must include 0 (plain DDPM, the baseline of every pair), "
                             f"got {list(self.lambdas)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or any(
                isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.seeds):
            raise ValueError(f"--seeds must be distinct ints >= 0, got {list(self.seeds)}")
        if any(not real(t) or t <= 0 for t in self.temperatures):
            raise ValueError(f"--temperatures must be finite floats > 0, got {list(self.temperatures)}")
        if not self.references or any(r not in REFERENCES for r in self.references) or len(
                set(self.references)) != len(self.references):
            raise ValueError(f"--references must name distinct reference sets of {', '.join(REFERENCES)}, "
                             f"got {list(self.references)}")
        for name in ("steps", "batch_size", "T", "base_channels", "num_res_blocks", "k"):
            positive_int(name)
        if isinstance(self.n_samples, bool) or not isinstance(self.n_samples, int) or self.n_samples < self.k + 1:
            raise ValueError(f"--n-samples must be an int >= k + 1 = {self.k + 1} (PRDC's k-NN radii), "
                             f"got {self.n_samples!r}")
        if not real(self.lr) or self.lr <= 0:
            raise ValueError(f"--lr must be a finite float > 0, got {self.lr!r}")
        if not real(self.grad_clip) or self.grad_clip < 0:
            raise ValueError(f"--grad-clip must be a finite float >= 0 (0: no clipping), got {self.grad_clip!r}")
        if not real(self.ema_decay) or not 0 <= self.ema_decay < 1:
            raise ValueError(f"--ema-decay must be in [0, 1) (0: no EMA), got {self.ema_decay!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not self.channel_mult or any(isinstance(m, bool) or not isinstance(m, int) or m < 1
                                        for m in self.channel_mult):
            raise ValueError(f"--channel-mult must be ints >= 1, got {list(self.channel_mult)}")
        if not real(self.test_fraction) or not 0 < self.test_fraction < 1 or round(self.test_fraction * 1797) <= self.k:
            raise ValueError(f"--test-fraction must be in (0, 1) and hold more than k = {self.k} digits, "
                             f"got {self.test_fraction!r}")

    def arms(self) -> list[tuple[float, int]]:
        """(lambda, seed) of every arm, seed by seed (a stopped run has whole pairs done)."""
        return [(float(lam), seed) for seed in self.seeds for lam in sorted(self.lambdas)]

    def taus(self, lam: float) -> tuple[float, ...]:
        """The temperatures an arm samples at: all of them for lambda = 0, tau = 1 otherwise."""
        return self.temperatures if lam == 0 else (1.0,)


def arm_folder(out: Path, lam: float, seed: int) -> Path:
    return out / "runs" / f"lambda_{lam:g}_seed_{seed}"


def run_arm(cfg: DigitsConfig, lam: float, seed: int, data: dict, resume: bool, log: Callable[[str], None]) -> dict:
    """Train, sample and evaluate one arm; returns its result.json ({"rows", timings}), written atomically."""
    from ..plots import write_samples
    from ..train import TrainConfig, Trainer
    from .digits_arm import digits_unet, prdc_rows, tempered_ddpm_sample

    out = Path(cfg.out)
    folder = arm_folder(out, lam, seed)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    model = digits_unet(seed, base_channels=cfg.base_channels, channel_mult=cfg.channel_mult,
                        num_res_blocks=cfg.num_res_blocks)
    trainer = Trainer(model, data["train"], TrainConfig(
        out_dir=str(folder / "train"), steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
        grad_clip=cfg.grad_clip or None, ema_decay=cfg.ema_decay, iso_lambda=lam, iso_mode="batch",
        schedule=cfg.schedule, T=cfg.T, seed=seed, ckpt_every=max(1, cfg.steps // 4), keep_checkpoints=1,
        log_every=max(1, min(50, cfg.steps)), device="cpu", backend=cfg.backend, progress=cfg.progress,
        tensorboard=False, data={"name": "digits", "image_size": 8}))
    trainer.fit(resume=resume)
    train_wall, train_cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    sampler = trainer.ema_model.eval()
    refs = {ref: data["test" if ref == "test" else "train_ref"] for ref in cfg.references}
    rows = []
    (out / "grids").mkdir(exist_ok=True)
    for tau in cfg.taus(lam):
        samples = tempered_ddpm_sample(sampler, (cfg.n_samples, 1, 8, 8), trainer.schedule, seed, tau, cfg.clip_x0,
                                       cfg.backend, cfg.progress)
        rows += prdc_rows(samples, refs, cfg.k, dataset="digits", **{"lambda": lam}, temperature=tau, seed=seed,
                          step=cfg.steps)
        if tau == 1.0 or tau == min(cfg.temperatures):
            name = f"lambda_{lam:g}_seed_{seed}" + ("" if tau == 1.0 else f"_tau_{tau:g}")
            write_samples(samples[:64], out / "grids" / f"{name}.png")
    result = {"rows": rows, "train_wall_s": train_wall, "train_cpu_s": train_cpu,
              "sample_wall_s": time.perf_counter() - wall0 - train_wall,
              "sample_cpu_s": time.process_time() - cpu0 - train_cpu}
    atomic_write_text(folder / "result.json", json.dumps(result) + "\n")
    log(f"digits_study: lambda {lam:g} seed {seed}: trained {cfg.steps} steps in {train_wall:.0f} s wall "
        f"({train_cpu:.0f} s CPU), sampled {len(cfg.taus(lam))} x {cfg.n_samples} in "
        f"{result['sample_wall_s']:.0f} s wall ({result['sample_cpu_s']:.0f} s CPU)")
    return result


def prepare(cfg: DigitsConfig, resume: bool) -> Path:
    """Validate ``cfg`` and the output folder before any training."""
    cfg.validate()
    out = writable_output_dir(cfg.out)
    old = resumed_record(out, "study.json", resume, "a digits study")
    if old is not None:
        refuse_changed_settings(out, "study.json", old, dataclasses.asdict(cfg), ignore=_FREE_ON_RESUME,
                                hint=f"only {', '.join(_FREE_ON_RESUME[1:])} may change")
    return out


def run_study(cfg: DigitsConfig, resume: bool = False, log: Callable[[str], None] | None = None) -> list[dict]:
    """Run every arm of ``cfg`` (finished ones read back on ``resume``), write prdc.csv, summary.md and the
    figures; returns the PRDC rows."""
    from tqdm.auto import tqdm

    from .digits_arm import split_digits
    from .digits_report import write_report

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out = prepare(cfg, resume)
    atomic_write_text(out / "study.json", json.dumps(dataclasses.asdict(cfg), indent=1) + "\n")
    load0, wall0, cpu0 = os.getloadavg(), time.perf_counter(), time.process_time()
    data = split_digits(cfg.test_fraction, cfg.split_seed)
    results = []
    for lam, seed in tqdm(cfg.arms(), desc="digits arms", disable=not cfg.progress, unit="arm"):
        done = arm_folder(out, lam, seed) / "result.json"
        if resume and done.exists():
            log(f"digits_study: lambda {lam:g} seed {seed}: finished earlier, read back")
            results.append(json.loads(done.read_text()))
        else:
            results.append(run_arm(cfg, lam, seed, data, resume, log))
    rows = [r for res in results for r in res["rows"]]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "prdc.csv", buf.getvalue())
    timing = {"wall_s": time.perf_counter() - wall0, "cpu_s": time.process_time() - cpu0,
              **arm_totals(results),
              "loadavg_start": load0, "loadavg_end": os.getloadavg(), "torch_threads": _threads(),
              "n_train": int(data["train"].shape[0]), "n_reference": int(data["test"].shape[0]),
              "train_sq_norm": float(data["train"].flatten(1).square().sum(1).mean())}
    atomic_write_text(out / "timing.json", json.dumps(timing, indent=1) + "\n")
    write_report(out, cfg, rows, timing)
    return rows


def arm_totals(results: list[dict]) -> dict[str, float]:
    """Wall and CPU seconds of every arm's training and sampling, summed from the arms' results (arms read back
    on --resume included: the cost of the whole study, however many invocations it took)."""
    return {f"arms_{part}_{kind}_s": sum(r[f"{part}_{kind}_s"] for r in results)
            for part in ("train", "sample") for kind in ("wall", "cpu")}


def rewrite_report(out: str | Path) -> None:
    """Write summary.md and the figures of the finished study in ``out`` again, from its study.json, timing.json
    and the arms' result.json (e.g. after a change to the report); nothing is trained or sampled."""
    from .digits_report import write_report

    out = Path(out)
    if not (out / "timing.json").exists():
        raise FileNotFoundError(f"--out {str(out)!r} holds no finished digits study (no timing.json)")
    cfg = DigitsConfig(**json.loads((out / "study.json").read_text()))
    results = [json.loads((arm_folder(out, lam, seed) / "result.json").read_text()) for lam, seed in cfg.arms()]
    timing = {**json.loads((out / "timing.json").read_text()), **arm_totals(results)}
    write_report(out, cfg, [r for res in results for r in res["rows"]], timing)


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _parser() -> argparse.ArgumentParser:
    from ..commands import HelpFormatter

    d = DigitsConfig(out="")
    p = argparse.ArgumentParser(prog="python -m isofast.experiments.digits_study", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--lambdas", nargs="+", type=float, default=list(d.lambdas), help="penalty weights (must hold 0)")
    p.add_argument("--seeds", nargs="+", type=int, default=list(d.seeds), help="seeds (each one pair of arms)")
    p.add_argument("--temperatures", nargs="+", type=float, default=list(d.temperatures), metavar="TAU",
                   help="temperatures > 0 of the lambda = 0 arms (1 is always sampled)")
    p.add_argument("--references", nargs="+", default=list(d.references), metavar="REF",
                   help=f"PRDC reference sets, of {', '.join(REFERENCES)}")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps per arm")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="batch size")
    p.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate")
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max grad norm (0: none)")
    p.add_argument("--ema-decay", type=float, default=d.ema_decay, help="EMA decay (0: none; samples from the EMA)")
    p.add_argument("--schedule", default=d.schedule, help=f"noise schedule, of {', '.join(SCHEDULES)}")
    p.add_argument("--T", type=int, default=d.T, help="diffusion steps (training and sampling)")
    p.add_argument("--base-channels", type=int, default=d.base_channels, help="UNet width of the 8x8 level")
    p.add_argument("--channel-mult", nargs="+", type=int, default=list(d.channel_mult),
                   help="UNet width of each level (8x8, 4x4, ...) as multiples of --base-channels")
    p.add_argument("--num-res-blocks", type=int, default=d.num_res_blocks, help="ResBlocks per UNet level")
    p.add_argument("--n-samples", type=int, default=d.n_samples, help="samples per arm and temperature")
    p.add_argument("--no-clip-x0", action="store_true",
                   help="do not clamp the sampler's x0 estimate to [-1, 1] (DDPM's image sampler clamps it)")
    p.add_argument("--k", type=int, default=d.k, help="PRDC neighbourhood size")
    p.add_argument("--test-fraction", type=float, default=d.test_fraction, help="share of the digits held out")
    p.add_argument("--split-seed", type=int, default=d.split_seed, help="seed of the train/test split")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--backend", default=None, help="isofast op backend (default: automatic)")
    p.add_argument("--resume", action="store_true", help="continue the study in --out (finished arms are kept)")
    p.add_argument("--report-only", action="store_true",
                   help="write summary.md and the figures of the finished study in --out again (no training)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (they are drawn only on a terminal)")
    return p


def config_from_args(args: argparse.Namespace) -> DigitsConfig:
    from ..commands import show_progress

    return DigitsConfig(
        out=args.out, lambdas=tuple(args.lambdas), seeds=tuple(args.seeds), temperatures=tuple(args.temperatures),
        references=tuple(args.references), steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        grad_clip=args.grad_clip, ema_decay=args.ema_decay, schedule=args.schedule, T=args.T,
        base_channels=args.base_channels, channel_mult=tuple(args.channel_mult), num_res_blocks=args.num_res_blocks,
        n_samples=args.n_samples, clip_x0=not args.no_clip_x0, k=args.k, test_fraction=args.test_fraction,
        split_seed=args.split_seed, backend=args.backend, progress=show_progress(args.no_progress))


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.report_only:
        try:
            rewrite_report(args.out)
        except (OSError, ValueError, KeyError) as exc:
            parser.error(str(exc))
        print(f"digits_study: wrote {args.out}/summary.md and the figures again")
        return 0
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    cfg = config_from_args(args)
    try:
        prepare(cfg, args.resume)  # bad input fails here, before any training
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    run_study(cfg, resume=args.resume)
    print(f"digits_study: wrote {cfg.out}/prdc.csv and {cfg.out}/summary.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
