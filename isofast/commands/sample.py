"""`isofast sample`: draw samples from a trained checkpoint (EMA weights by default).

DDPM ancestral sampling over all T steps, or DDIM with any number of steps and eta; on a GPU the
loop runs as a CUDA graph. Writes a PNG grid (images) or scatter (2D points, all of them), one PNG per
image with --png-each, and/or an .npz with the raw samples. For image models the predicted x0 is clipped
to the data range [-1, 1] at every step (as diffusers' schedulers do; --no-clip-x0 turns it off), so the
samples lie in [-1, 1]; 2D points are not clipped.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from . import HelpFormatter, add_checkpoint_argument, show_progress

if TYPE_CHECKING:
    import torch


def sample_shape(meta: dict) -> tuple[int, ...]:
    """Per-sample shape of the model a checkpoint holds, from its recorded model spec."""
    spec = meta.get("model_spec") or {}
    config = spec.get("config", {})
    if spec.get("kind") == "unet":
        return (int(config.get("in_channels", 3)), int(config["image_size"]), int(config["image_size"]))
    if spec.get("kind") == "diffusers_unet2d":
        from ..diffusers_bridge.models import unet2d_sample_shape

        return unet2d_sample_shape(config)
    if spec.get("kind") in ("mlp", "authors_mlp"):  # the 2-D models (isofast.models.registry.MODELS_2D)
        return (int(config.get("data_dim", 2)),)
    from ..checkpoint import CheckpointError

    raise CheckpointError(f"checkpoint records an unknown model kind {spec.get('kind')!r}")


def draw_samples(args: argparse.Namespace) -> tuple[torch.Tensor, dict]:
    """Load the checkpoint named by ``args.checkpoint`` and sample ``args.num`` items from it."""
    import torch

    from ..checkpoint import load_trained_model
    from ..distributed import pick_device
    from ..sampling import ddim_sample, ddpm_sample

    device = pick_device(args.device)  # the trainer's rule: "auto", and a clear error for unavailable CUDA
    model, sched, meta = load_trained_model(args.checkpoint, which=args.weights, device=device)
    shape = (args.num, *sample_shape(meta))
    clip_x0 = args.clip_x0 if args.clip_x0 is not None else len(shape) == 4  # images: clip by default
    common = dict(clip_x0=clip_x0, generator=torch.Generator().manual_seed(args.seed), device=device,
                  cuda_graph=None if not args.no_cuda_graph else False, progress=show_progress(args.no_progress),
                  backend=args.backend, batch_size=args.batch_size)
    with torch.no_grad():
        if args.sampler == "ddpm":
            samples = ddpm_sample(model, shape, sched, variance=args.variance, **common)
        else:
            samples = ddim_sample(model, shape, sched, steps=args.steps, eta=args.eta, **common)
    return samples.float().cpu(), meta


def write_npz(samples, path: Path, meta: dict) -> None:
    import io

    import numpy as np

    from ..io import atomic_write_bytes

    buffer = io.BytesIO()
    np.savez(buffer, samples=samples.numpy(), step=np.int64(meta.get("step", -1)))
    atomic_write_bytes(path, buffer.getvalue())


def plot_title(args: argparse.Namespace, meta: dict) -> str:
    """Which run, step and lambda a scatter plot shows (the plot adds the point count)."""
    config = meta.get("config", {})
    run = Path(config.get("out_dir") or args.checkpoint).name
    return f"{run}, step {meta.get('step')}, λ = {config.get('iso_lambda', 0):g}, {args.sampler}"


def run(args: argparse.Namespace) -> int:
    """Sample as the arguments say; bad input raises and `isofast.cli.main` reports it (one line, or the
    traceback under ``--debug``)."""
    from ..plots import write_samples

    if args.num < 1:
        raise ValueError("--num must be >= 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    samples, meta = draw_samples(args)
    formats = set(args.format.split(","))
    if "npz" in formats:
        write_npz(samples, out / "samples.npz", meta)
    if "png" in formats:
        # 2D points are cheap to draw: all of them; images: the first --grid-max
        shown = samples if samples.ndim == 2 else samples[: args.grid_max]
        write_samples(shown, out / "samples.png", title=plot_title(args, meta))
    if args.png_each and samples.ndim == 4:
        from torchvision.utils import save_image

        for i, image in enumerate(samples):
            save_image((image.clamp(-1, 1) + 1) / 2, str(out / f"{i:06d}.png"))
    print(f"isofast sample: {len(samples)} samples from step {meta.get('step')} -> {out}", file=sys.stderr)
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("sample", help="sample from a trained checkpoint", description=__doc__,
                              formatter_class=HelpFormatter)
    add_checkpoint_argument(p)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num", type=int, default=64, help="number of samples")
    p.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm",
                   help="ddpm: all T steps, ancestral; ddim: --steps steps")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic, 1: DDPM-like)")
    p.add_argument("--variance", choices=("fixed_small", "fixed_large"), default="fixed_small",
                   help="DDPM step variance: the posterior's (small) or beta_t (large)")
    p.add_argument("--clip-x0", action=argparse.BooleanOptionalAction, default=None,
                   help="clip the predicted x0 to [-1, 1] at each step (default: on for images, off for 2D points)")
    p.add_argument("--weights", choices=("ema", "model"), default="ema", help="EMA or raw weights")
    p.add_argument("--format", default="png,npz", help="comma-separated: png (one grid), npz (raw samples)")
    p.add_argument("--png-each", action="store_true", help="also write one PNG per image")
    p.add_argument("--grid-max", type=int, default=256, help="at most this many images in the grid (2D plots show every point)")
    p.add_argument("--batch-size", type=int, default=None, help="sample in chunks of this size (default: all at once)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler's noise")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    p.add_argument("--backend", default=None, help="isofast op backend (default: auto)")
    p.add_argument("--no-cuda-graph", action="store_true", help="run the GPU loop eagerly")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (none is drawn when stderr is "
                   "not a terminal)")
    p.set_defaults(func=run)
