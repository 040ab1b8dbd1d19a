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


def run(args: argparse.Namespace) -> int:
    import torch

    from ..experiments.toy2d import config_from_preset, prepare_output, run_sweep

    if args.threads is not None:
        if args.threads < 1:
            print("isofast toy2d: error: --threads must be >= 1", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    progress = show_progress(args.no_progress)
    try:
        cfg = config_from_preset(
            args.preset, args.quick, out=args.out, datasets=args.datasets, lambdas=args.lambdas, seeds=args.seeds,
            steps=args.steps, batch_size=args.batch_size, lr=args.lr, device=args.device, backend=args.backend,
            progress=progress)
        prepare_output(cfg, args.resume)  # bad input fails here, before any training
    except (ValueError, TypeError, OSError) as exc:
        print(f"isofast toy2d: error: {exc}", file=sys.stderr)
        return 2
    jobs = args.jobs if args.jobs is not None else min(2, os.cpu_count() or 1)
    if jobs < 1:
        print("isofast toy2d: error: --jobs must be >= 1", file=sys.stderr)
        return 2
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
                        help="default (the default): the four-dataset sweep, 24 runs, about 25 CPU-minutes (2-core VM, 2026-11-30: 70 min "
                             "wall under load ~9.5, 2 jobs; see the README); paper: the paper's protocol (batch 64, "
                             "1000 epochs, 3 seeds)")
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
    parser.add_argument("--engine", choices=("single", "ensemble"), default="single",
                        help="single: one Trainer per run (default); ensemble: all runs trained and sampled as one "
                             "batched ensemble (isofast.ensemble; each member equals its single run)")
    parser.add_argument("--resume", action="store_true",
                        help="continue a sweep in --out: finished runs are reused, an interrupted one resumes")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)
