"""`isofast toy2d`: DDPM vs Iso-Diffusion lambda sweep on the 2D datasets, measured by PRDC.

See `isofast.experiments.toy2d` for what one run does and what the output folder holds.
"""
from __future__ import annotations

import argparse
import os
import sys

from . import HelpFormatter, show_progress

SMOKE_TEST_NOTE = ("isofast toy2d: --quick is a smoke test (20 steps, 500 points, T = 50): it checks that the sweep "
                   "runs; its numbers say nothing about DDPM vs Iso-Diffusion")


def run_protocol(args: argparse.Namespace) -> int:
    """`--protocol NAME`: the protocol study (isofast.experiments.study) on the ensemble engine."""
    import torch

    from ..experiments.study import prepare_study, run_study, study_config
    from ..experiments.toy2d import PAPER_DATASETS

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cfg = study_config(
        args.protocol, args.out, args.datasets or PAPER_DATASETS, lambdas=args.lambdas, seeds=args.seeds,
        temperatures=args.temperatures, eval_at=args.eval_at, device=args.device, backend=args.backend,
        progress=show_progress(args.no_progress), steps=args.steps, batch_size=args.batch_size,
        lr=args.lr, timesteps=args.timesteps, data_noise=args.data_noise, n_points=args.n_points,
        ema_decay=args.ema_decay, grad_clip=args.grad_clip, model=args.model, references=args.eval_against,
        n_eval=args.n_eval)
    prepare_study(cfg, args.resume)  # bad input fails here, before any training (`isofast.cli.main` reports it)
    run_study(cfg, resume=args.resume)
    print(f"isofast toy2d: wrote {cfg.out}/prdc.csv and {cfg.out}/summary.md")
    return 0


_STUDY_ONLY = ("timesteps", "data_noise", "n_points", "ema_decay", "grad_clip", "model", "eval_against",
               "temperatures", "eval_at", "n_eval")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..experiments.toy2d import config_from_preset, prepare_output, run_sweep

    if args.threads is not None and args.threads < 1:
        raise ValueError("--threads must be >= 1")
    if args.protocol is not None:
        return run_protocol(args)
    given = [f"--{k.replace('_', '-')}" for k in _STUDY_ONLY if getattr(args, k) is not None]
    if given:
        raise ValueError(f"{', '.join(given)} need --protocol (e.g. --protocol isofast for today's setup)")

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    progress = show_progress(args.no_progress)
    cfg = config_from_preset(
        args.preset, args.quick, out=args.out, datasets=args.datasets, lambdas=args.lambdas, seeds=args.seeds,
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, device=args.device, backend=args.backend,
        progress=progress)
    prepare_output(cfg, args.resume)  # bad input fails here, before any training (`isofast.cli.main` reports it)
    jobs = args.jobs if args.jobs is not None else min(2, os.cpu_count() or 1)
    if jobs < 1:
        raise ValueError("--jobs must be >= 1")
    if args.quick:
        print(SMOKE_TEST_NOTE, file=sys.stderr)
    run_sweep(cfg, resume=args.resume, jobs=jobs, engine=args.engine)
    with open(f"{cfg.out}/results.md") as f:
        print(f.read(), end="")
    if args.quick:
        print(SMOKE_TEST_NOTE, file=sys.stderr)
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "toy2d", help="DDPM vs Iso-Diffusion lambda sweep on the 2D datasets (PRDC table, scatter grid)",
        description="Train DDPM (lambda = 0) and Iso-Diffusion for each lambda, dataset and seed; sample 10,000 "
                    "points from each EMA model; write PRDC tables (Markdown, CSV), a real-vs-generated scatter "
                    "grid and forward-process isotropy plots into --out.",
        formatter_class=HelpFormatter)
    parser.add_argument("--preset", choices=("default", "paper"), default="default",
                        help="default (the default): the four-dataset sweep, 24 runs, about 5 CPU-minutes on the ensemble engine "
                             "(2-core VM, 2026-12-01: 2.3 min wall with --threads 2 on an idle machine in its fast "
                             "period; 5.9 min in its slow one with earlier code); about 25 CPU-minutes with --engine single; see the "
                             "README); paper: the paper's protocol (batch 64, 1000 epochs, 3 seeds, 72 runs; with "
                             "--threads 2 on a 2-core VM 51 min wall measured in the machine's fast period; earlier code "
                             "took ~2 h in its slow one; see results/toy2d_paper)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 2 datasets, 2 lambdas, 1 seed, 20 steps, 500 points, T = 50 with the "
                             "cosine schedule (made for any T); checks that the sweep runs, measures nothing")
    parser.add_argument("--datasets", nargs="+", metavar="NAME",
                        help="datasets (default: swiss_roll moon_scatter moon_circles central_banana)")
    parser.add_argument("--lambdas", nargs="+", type=float, metavar="L",
                        help="isotropy penalty weights (default: 0 0.01 0.05 0.1 0.2 0.3)")
    parser.add_argument("--seeds", nargs="+", type=int, metavar="S", help="run seeds (default: the preset's)")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default: the preset's)")
    parser.add_argument("--batch-size", type=int, help="training batch (default: the preset's)")
    parser.add_argument("--lr", type=float, help="Adam learning rate (default 1e-3)")
    parser.add_argument("--out", default="results/toy2d", help="output folder (default: results/toy2d)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--backend", default=None, help="isofast op backend (default: auto)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--jobs", type=int,
                        help="runs trained at once, one process each, torch threads split between them "
                             "(default: min(2, CPU cores)); results do not depend on it")
    parser.add_argument("--engine", choices=("single", "ensemble"), default="ensemble",
                        help="ensemble (default): all runs trained and sampled as one batched ensemble "
                             "(isofast.ensemble; each member equals its single run to 1e-5, saved every 2000 "
                             "steps for --resume); single: one Trainer per run, --jobs at a time")
    parser.add_argument("--resume", action="store_true",
                        help="continue a sweep in --out: finished runs are reused, an interrupted one resumes; "
                        "with --protocol, a larger --steps extends a finished study (the evaluations made are kept) "
                        "and a new --eval-at fraction before its last save is evaluated by replaying the members "
                        "from step 0 (checked against the saved loss log)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    study = parser.add_argument_group(
        "protocol study", "--protocol NAME runs a protocol's lambda sweep on the ensemble engine, with a temperature "
        "baseline, several training lengths and paired intervals over seeds; writes prdc.csv and summary.md "
        "(isofast.experiments.study). The options below override the protocol's settings.")
    study.add_argument("--protocol", choices=("isofast", "authors2024", "authors2025"),
                       help="isofast: today's setup; authors2024 / authors2025: the authors' 2024 / 2025 code "
                            "(see isofast.experiments.protocols; default: none, the classic sweep above)")
    study.add_argument("--timesteps", choices=("per-sample", "per-batch"),
                       help="per-sample: one t per row (DDPM); per-batch: one t shared by the batch (default: the protocol's)")
    study.add_argument("--data-noise", type=float, help="data noise of the datasets that have one (default: the protocol's)")
    study.add_argument("--n-points", type=int, help="points generated per run, before a train/test split (default: the protocol's)")
    study.add_argument("--ema-decay", type=float, help="EMA decay of the weights, 0: none (default: the protocol's)")
    study.add_argument("--grad-clip", type=float, help="max gradient norm, 0: no clipping (default: the protocol's)")
    study.add_argument("--model", choices=("mlp", "authors_mlp"), help="the 2-D noise predictor (default: the protocol's)")
    study.add_argument("--eval-against", nargs="+", choices=("fresh", "train", "test"), metavar="REF",
                       help="PRDC reference sets: fresh points, the training points, the held-out points (default: the protocol's)")
    study.add_argument("--temperatures", nargs="+", type=float, metavar="TAU",
                       help="temperatures at which the lambda = 0 models also sample (default: 1 only; 1 is always sampled)")
    study.add_argument("--eval-at", nargs="+", type=float, metavar="F",
                       help="training lengths to evaluate, as fractions of the steps (default: 1 only; 1 is always evaluated)")
    study.add_argument("--n-eval", type=int, help="samples per model (default: the protocol's, 10,000)")
    parser.set_defaults(func=run)
