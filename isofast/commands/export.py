"""`isofast export`: write a trained run in another library's format.

``isofast export RUN --diffusers OUT`` writes a diffusers ``DDPMPipeline`` folder (``save_pretrained``:
the run's EMA weights, a DDPMScheduler with the run's schedule) that ``DDPMPipeline.from_pretrained(OUT)``
loads. Only runs trained with ``--model diffusers-unet2d`` can be exported. Needs diffusers
(``pip install "isofast[diffusers]"``).
"""
from __future__ import annotations

import argparse
import sys

from . import HelpFormatter, add_checkpoint_argument


def run(args: argparse.Namespace) -> int:
    """Export as the arguments say; bad input raises and `isofast.cli.main` reports it (one line, or the
    traceback under ``--debug``)."""
    from ..diffusers_bridge.pipeline import export_ddpm_pipeline

    out = export_ddpm_pipeline(args.checkpoint, args.diffusers, which=args.weights)
    print(f"isofast export: DDPMPipeline -> {out} (load with DDPMPipeline.from_pretrained)", file=sys.stderr)
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("export", help="write a trained run as a diffusers DDPMPipeline", description=__doc__,
                              formatter_class=HelpFormatter)
    add_checkpoint_argument(p)
    p.add_argument("--diffusers", required=True, metavar="OUT",
                   help="write a diffusers DDPMPipeline (save_pretrained) into this new or empty folder")
    p.add_argument("--weights", choices=("ema", "model"), default="ema",
                   help="the run's EMA weights or its raw model weights")
    p.set_defaults(func=run)
