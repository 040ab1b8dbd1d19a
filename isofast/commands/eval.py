"""`isofast eval`: FID, Inception Score and PRDC of generated samples against real data.

Samples come from `isofast sample` (an .npz with ``samples`` in [-1, 1]). Real images come from an
image dataset by name (digits, flowers102, pets, folder; no random flip), or from another .npz.
FID and IS need the standard FID Inception weights (pt_inception-2015-12-05-6726825d.pth) from a
local file: --inception-weights PATH or ISOFAST_INCEPTION_WEIGHTS; nothing is ever downloaded.
FID is computed in float64 and refused below --min-fid-samples (2048) per side; IS uses 10 splits.
PRDC uses k = 5 on raw pixels (as the Iso-Diffusion paper did for images) or on Inception features.
The report (JSON) records the sample counts, the feature extractor and the versions.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import HelpFormatter

DATA_RANGE = (-1.0, 1.0)  # the range `isofast sample` writes and the real data is scaled to


def load_npz_samples(path: str | Path, name: str):
    """The float32 tensor (N, ...) of the array ``samples`` in the .npz ``path``; ``name`` names the argument
    in errors (ValueError / FileNotFoundError, one line each)."""
    import zipfile

    import numpy as np
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{name}: no such file {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise ValueError(f"{name}: {path} is a single .npy array, not an .npz with a 'samples' array")
            if "samples" not in data:
                raise ValueError(f"{name}: {path} has no 'samples' array (keys: {list(data.keys())})")
            array = data["samples"]
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{name}: {path} is not a readable .npz ({type(exc).__name__}); expected the samples.npz "
                         "that `isofast sample` writes") from None
    except ValueError as exc:
        if str(exc).startswith(name):
            raise
        # numpy's text for a file that is no .npz (a PNG, say) talks of pickles: name what was expected instead
        raise ValueError(f"{name}: {path} is not an .npz file of arrays; expected the samples.npz that "
                         "`isofast sample` writes") from None
    if array.dtype.kind not in "fiu":
        raise ValueError(f"{name}: 'samples' in {path} has dtype {array.dtype}, expected numbers")
    if array.ndim < 2 or array.shape[0] == 0:
        raise ValueError(f"{name}: 'samples' in {path} has shape {array.shape}, expected (N, ...) with N >= 1")
    samples = torch.from_numpy(np.asarray(array, dtype=np.float32))
    if not torch.isfinite(samples).all():
        raise ValueError(f"{name}: {path} holds NaN or inf values")
    return samples


def out_of_range_warning(samples, name: str) -> str | None:
    """A one-line warning when samples leave `DATA_RANGE` (a sampler that diverged, or unclipped DDIM)."""
    low, high = DATA_RANGE
    outside = ((samples < low) | (samples > high)).flatten(1).any(dim=1)
    count = int(outside.sum())
    if not count:
        return None
    return (f"isofast eval: warning: {count} of {len(samples)} {name} have values outside [{low:g}, {high:g}] "
            f"(min {float(samples.min()):.3g}, max {float(samples.max()):.3g}); the metrics compare them as they "
            "are (sample with clipping, e.g. `isofast sample --sampler ddim` without --no-clip-x0)")


def load_real(args: argparse.Namespace, like):
    """Real data as a tensor of the samples' per-item shape (at most --num-real items)."""
    import torch

    if args.real.endswith(".npz"):
        real = load_npz_samples(args.real, "--real")
    else:
        from ..data.images import make_image_dataset

        size = like.shape[-1] if like.ndim == 4 else None
        dataset = make_image_dataset(args.real, root=args.data_root, image_size=size, random_flip=False)
        count = min(len(dataset), args.num_real or len(dataset))
        real = torch.stack([dataset[i] for i in range(count)])
    if args.num_real:
        real = real[: args.num_real]
    if real.shape[1:] != like.shape[1:]:
        raise ValueError(f"real items have shape {tuple(real.shape[1:])}, samples {tuple(like.shape[1:])}")
    return real


def inception_features(images, model, batch_size: int, device: str):
    """(pool3 features, logits) as numpy arrays of images (N, C, H, W) in [-1, 1]."""
    from ..metrics.fid import extract_features

    if images.ndim != 4:
        raise ValueError(f"FID/IS need images (N, C, H, W), got shape {tuple(images.shape)}")
    if images.shape[1] == 1:  # grey images: Inception expects RGB
        images = images.expand(-1, 3, -1, -1)
    return extract_features(images, model, batch_size=batch_size, device=device)


def evaluate(args: argparse.Namespace) -> dict:
    import platform

    import torch

    from .. import __version__
    from ..distributed import pick_device
    from ..metrics.prdc import prdc

    metrics = set(args.metrics.split(","))
    unknown = metrics - {"fid", "is", "prdc"}
    if unknown:
        raise ValueError(f"--metrics: unknown {sorted(unknown)}; choose from fid, is, prdc")
    fake = load_npz_samples(args.samples, "samples")
    warning = out_of_range_warning(fake, "samples")
    if warning:
        print(warning, file=sys.stderr)
    real = load_real(args, fake)
    device = pick_device(args.device)  # the trainer's rule: "auto", and a clear error for unavailable CUDA
    report: dict = {
        "samples": str(args.samples),
        "real": args.real,
        "num_samples": len(fake),
        "num_real": len(real),
        "versions": {"isofast": __version__, "torch": torch.__version__, "python": platform.python_version()},
    }
    needs_inception = bool(metrics & {"fid", "is"}) or (("prdc" in metrics) and args.prdc_features == "inception")
    if needs_inception:
        from ..metrics.fid import fid_from_features, inception_score
        from ..metrics.inception import load_inception

        try:
            model = load_inception(args.inception_weights, device=device)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{exc} Without them: --metrics prdc (PRDC on pixels).") from None
        report["feature_extractor"] = "FID Inception-v3 (pt_inception-2015-12-05), pool3 2048-d / 1008 logits"
        fake_pool, fake_logits = inception_features(fake, model, args.batch_size, device)
        real_pool = inception_features(real, model, args.batch_size, device)[0] if metrics & {"fid", "prdc"} else None
        if "fid" in metrics:
            report["fid"] = fid_from_features(fake_pool, real_pool, min_samples=args.min_fid_samples)
        if "is" in metrics:
            mean, std = inception_score(fake_logits, splits=args.is_splits)
            report["inception_score"] = {"mean": mean, "std": std, "splits": args.is_splits}
    if "prdc" in metrics:
        if args.prdc_features == "inception":
            real_f, fake_f = torch.from_numpy(real_pool), torch.from_numpy(fake_pool)
        else:
            real_f, fake_f = real.reshape(len(real), -1), fake.reshape(len(fake), -1)
        report["prdc"] = {**prdc(real_f, fake_f, k=args.k), "k": args.k, "features": args.prdc_features}
    return report


def run(args: argparse.Namespace) -> int:
    import json

    from ..io import atomic_write_text

    report = evaluate(args)  # bad input raises: `isofast.cli.main` reports it
    text = json.dumps(report, indent=2)
    if args.out:
        atomic_write_text(args.out, text + "\n")
    print(text)
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="FID / IS / PRDC of samples against real data", description=__doc__,
                              formatter_class=HelpFormatter)
    p.add_argument("samples", help=".npz written by `isofast sample` (array 'samples' in [-1, 1])")
    p.add_argument("--real", default="digits", help="real data: an image dataset name (digits, flowers102, pets, "
                   "folder) or an .npz with a 'samples' array")
    p.add_argument("--data-root", default=None, help="folder of the real image dataset (default: none; needed except for digits)")
    p.add_argument("--num-real", type=int, default=None, help="use at most this many real items (default: all)")
    p.add_argument("--metrics", default="fid,is,prdc", help="comma-separated subset of fid, is, prdc")
    p.add_argument("--inception-weights", default=None,
                   help="path to pt_inception-2015-12-05-6726825d.pth (default: $ISOFAST_INCEPTION_WEIGHTS)")
    p.add_argument("--prdc-features", choices=("pixels", "inception"), default="pixels",
                   help="the space PRDC measures distances in")
    p.add_argument("--k", type=int, default=5, help="PRDC nearest neighbours")
    p.add_argument("--is-splits", type=int, default=10, help="Inception Score splits")
    p.add_argument("--min-fid-samples", type=int, default=2048, help="refuse FID below this many samples per side")
    p.add_argument("--batch-size", type=int, default=50, help="images per Inception forward")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    p.add_argument("--out", default=None, help="also write the JSON report here, atomically (default: stdout only)")
    p.set_defaults(func=run)
