"""`isofast train`: train the 2D MLP or an image UNet with the Iso-Diffusion objective.

One process::

    isofast train --data swiss_roll --iso-lambda 0.3 --steps 20000 --out runs/swiss
    isofast train --config flowers64 --data flowers102 --data-root ~/data --iso-lambda 0.3 \\
        --precision bf16 --channels-last --out runs/flowers

Many GPUs (or CPU processes), the same command under torchrun (``--batch-size`` is the global batch)::

    torchrun --standalone --nproc_per_node 8 -m isofast.cli train --config flowers64 --data flowers102 ...

``--resume`` continues ``--out``'s latest checkpoint (``--resume PATH``: that checkpoint), with any
number of processes.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from ..schedule_names import SCHEDULES
from ..train_config import OPTIMIZERS, TrainConfig
from . import HelpFormatter, show_progress


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


# An Iso-Diffusion tool trains Iso-Diffusion unless told otherwise: 0.3 is the weight of the README's
# examples and of the paper-protocol comparison on swiss_roll (results/toy2d_paper_swiss_roll/); DDPM is
# --iso-lambda 0. (Before 2026-11-30 the default was 0, which surprised users of this tool.)
DEFAULT_ISO_LAMBDA = 0.3

_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _toy2d_names() -> tuple[str, ...]:
    from ..data.toy2d import DATASETS

    return tuple(DATASETS)


def _image_names() -> tuple[str, ...]:
    try:
        from ..data.images import DATASET_NAMES
    except ImportError:  # pragma: no cover - image support is optional
        return ()
    return tuple(DATASET_NAMES)


def build_model_and_data(args: argparse.Namespace):
    """(model, data, model_spec, sample_shape) for the parsed arguments; the model is built after seeding."""
    import torch

    toy, images = _toy2d_names(), _image_names()
    if args.data not in toy + images:
        raise ValueError(f"unknown --data {args.data!r}; 2D datasets: {', '.join(toy)}; image datasets: {', '.join(images)}")
    model_kind = args.model or ("mlp" if args.data in toy else "unet")
    if model_kind == "mlp":
        if args.data not in toy:
            raise ValueError(f"--model mlp trains on 2D data ({', '.join(toy)}), got --data {args.data}")
        from ..data.toy2d import make_dataset
        from ..models.mlp import TimeMLP

        data = make_dataset(args.data, n_points=args.n_points, seed=args.seed)
        torch.manual_seed(args.seed)
        model = TimeMLP(data_dim=data.shape[1], hidden=args.mlp_hidden, n_layers=args.mlp_layers)
        return model, data, None, tuple(data.shape[1:])
    if args.data not in images:
        raise ValueError(f"--model unet trains on images ({', '.join(images)}), got --data {args.data}")
    import dataclasses

    from ..data.images import make_image_dataset
    from ..models.unet import UNET_CONFIGS, UNet

    name = args.config or ("digits8" if args.data == "digits" and "digits8" in UNET_CONFIGS else "flowers64")
    if name not in UNET_CONFIGS:
        raise ValueError(f"unknown --config {name!r}; known: {', '.join(sorted(UNET_CONFIGS))}")
    config = UNET_CONFIGS[name]
    size = args.image_size or config.image_size
    dataset = make_image_dataset(args.data, root=args.data_root, image_size=size, download=args.download)
    channels = int(dataset[0].shape[0]) if isinstance(dataset[0], torch.Tensor) else int(dataset[0][0].shape[0])
    overrides = {}
    if size != config.image_size:
        overrides["image_size"] = size
    if channels != config.in_channels:
        overrides["in_channels"] = channels  # the data decides the channels, the config the architecture
    if overrides:
        print(f"isofast train: UNet config {name!r} with {overrides} to fit the data", file=sys.stderr)
        config = dataclasses.replace(config, **overrides)
    torch.manual_seed(args.seed)
    model = UNet(config)
    return model, dataset, None, (channels, size, size)


def make_sample_fn(sample_shape: tuple[int, ...], count: int, seed: int, backend: str | None):
    """sample_fn(model, step) -> ``count`` DDPM samples from the trainer's schedule, the same noise every time
    (so grids of successive steps are comparable)."""
    state = {}

    def sample_fn(model, step):
        import torch

        from ..sampling import ddpm_sample

        gen = torch.Generator(device="cpu").manual_seed(seed)
        return ddpm_sample(model, (count, *sample_shape), state["schedule"], generator=gen, progress=False,
                           backend=backend)

    return sample_fn, state


def run(args: argparse.Namespace) -> int:
    from ..train import Trainer

    try:
        model, data, spec, sample_shape = build_model_and_data(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"isofast train: error: {exc}", file=sys.stderr)
        return 2
    config = TrainConfig(
        out_dir=args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip or None, ema_decay=args.ema_decay,
        warmup_steps=args.warmup, iso_lambda=args.iso_lambda, iso_mode=args.iso_mode, schedule=args.schedule,
        T=args.T, seed=args.seed, log_every=args.log_every, ckpt_every=args.ckpt_every,
        sample_every=args.sample_every, precision=args.precision, channels_last=args.channels_last,
        compile=args.compile, device=args.device, backend=args.backend, num_workers=args.num_workers,
        progress=show_progress(args.no_progress), tensorboard=not args.no_tensorboard,
    )
    sample_fn = None
    if args.sample_every:
        count = args.sample_count or (2000 if len(sample_shape) == 1 else 64)
        sample_fn, holder = make_sample_fn(sample_shape, count, args.seed, args.backend)
    trainer = Trainer(model, data, config, sample_fn=sample_fn, model_spec=spec)
    if sample_fn is not None:
        holder["schedule"] = trainer.schedule
    try:
        trainer.fit(resume=args.resume if args.resume is not None else False)
    finally:
        trainer.close()
    if trainer.dist.is_main:
        print(f"isofast train: {trainer.step} steps done; run folder {config.out_dir} "
              f"(tensorboard: {trainer.tensorboard_status})", file=sys.stderr)
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a DDPM / Iso-Diffusion model (one process or under torchrun)",
        description=__doc__, formatter_class=HelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", choices=("mlp", "unet"), default=None,
                   help="mlp for 2D data, unet for images (default: from --data)")
    g.add_argument("--config", default=None, help="UNet config name (isofast.models.unet.UNET_CONFIGS; default: "
                   "digits8 for digits, else flowers64)")
    g.add_argument("--data", default="digits", help="a 2D dataset (swiss_roll, moon_scatter, moon_circles, "
                   "central_banana, moons, circles, gaussians8) or images (digits, flowers102, pets, folder); "
                   "digits (scikit-learn's 8x8 digits) needs no download")
    g.add_argument("--data-root", default=None, help="folder holding the image dataset (or the images, for folder; "
                   "default: none, needed except for digits and 2D data)")
    g.add_argument("--download", action="store_true", help="download flowers102/pets into --data-root")
    g.add_argument("--image-size", type=_positive_int, default=None, help="image side (default: the config's)")
    g.add_argument("--n-points", type=_positive_int, default=10000, help="points of a 2D dataset")
    g.add_argument("--mlp-hidden", type=_positive_int, default=128, help="width of the 2D MLP")
    g.add_argument("--mlp-layers", type=_positive_int, default=3, help="hidden layers of the 2D MLP")

    g = p.add_argument_group("objective and optimisation")
    g.add_argument("--iso-lambda", type=_non_negative_float, default=DEFAULT_ISO_LAMBDA,
                   help="isotropy penalty weight λ (>= 0); 0 trains plain DDPM")
    g.add_argument("--iso-mode", choices=("batch", "sample"), default="batch",
                   help="batch: the paper's penalty on the batch mean; sample: one penalty per sample")
    g.add_argument("--schedule", choices=SCHEDULES, default="linear", help="beta schedule")
    g.add_argument("--T", type=_positive_int, default=1000, help="diffusion steps")
    g.add_argument("--steps", type=_positive_int, default=10000, help="optimizer steps in all")
    g.add_argument("--batch-size", type=_positive_int, default=64, help="global batch (split over processes)")
    g.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="adam", help="optimizer")
    g.add_argument("--weight-decay", type=_non_negative_float, default=0.0, help="weight decay")
    g.add_argument("--grad-clip", type=_non_negative_float, default=1.0, help="max grad norm (0: off)")
    g.add_argument("--ema-decay", type=_non_negative_float, default=0.999, help="0: no EMA")
    g.add_argument("--warmup", type=_non_negative_int, default=0, help="LR warm-up steps")
    g.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the weights, data order and noise")

    g = p.add_argument_group("speed")
    g.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast of the model")
    g.add_argument("--channels-last", action="store_true")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    g.add_argument("--backend", default=None, help="isofast op backend (default: auto)")
    g.add_argument("--num-workers", type=_non_negative_int, default=0, help="DataLoader workers (image data)")

    g = p.add_argument_group("run folder")
    g.add_argument("--out", required=True, help="run folder: config, metrics.csv, TensorBoard, checkpoints, samples")
    g.add_argument("--resume", nargs="?", const=True, default=None, metavar="PATH",
                   help="continue the latest checkpoint of --out (or the checkpoint at PATH; default: a new run)")
    g.add_argument("--log-every", type=_positive_int, default=50, help="steps per metrics.csv row")
    g.add_argument("--ckpt-every", type=_positive_int, default=1000, help="steps per checkpoint")
    g.add_argument("--sample-every", type=_non_negative_int, default=0, help="sample grid every N steps (0: off)")
    g.add_argument("--sample-count", type=_positive_int, default=None,
                   help="samples per grid (default 64 images / 2000 points)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (none is drawn when stderr is not "
                   "a terminal)")
    g.add_argument("--no-tensorboard", action="store_true")
    p.set_defaults(func=run)
