"""`isofast train`: train the 2D MLP, an image UNet or a diffusers UNet2DModel with the Iso-Diffusion objective.

One process::

    isofast train --data swiss_roll --iso-lambda 0.3 --steps 20000 --out runs/swiss
    isofast train --config flowers64 --data flowers102 --data-root ~/data --iso-lambda 0.3 \\
        --precision bf16 --channels-last --out runs/flowers

Many GPUs (or CPU processes), the same command under torchrun (``--batch-size`` is the global batch)::

    torchrun --standalone --nproc_per_node 8 -m isofast.cli train --config flowers64 --data flowers102 ...

A larger batch than fits in memory: ``--grad-accum N`` runs N forward/backward passes of ``--batch-size``
samples per optimizer step (as accelerate's gradient_accumulation_steps with a per-pass batch), so one step
sees batch-size x N samples; the batch isotropy penalty (--iso-mode batch) is then that of each pass.

``--resume`` continues ``--out``'s newest complete checkpoint (``--resume PATH``: that checkpoint), with
any number of processes. It rebuilds the model and the data the run recorded, and keeps the run's settings:
options left out take the run's values; options that change what is trained (--lr, --iso-lambda, --seed,
--data, ...) are refused unless named by ``--override KEY`` (recorded in the run's history.jsonl);
--steps and the logging/checkpoint intervals may change freely. See the README, "Resuming a run".
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path

from ..schedule_names import SCHEDULES
from ..train_config import LOGGERS, OPTIMIZERS, PRECISIONS, TrainConfig
from . import HelpFormatter, show_progress

# argparse dest -> TrainConfig field: the options a resume takes from the run when they are not given.
_RUN_OPTIONS = {
    "steps": "steps", "batch_size": "batch_size", "grad_accum": "grad_accum", "lr": "lr", "optimizer": "optimizer",
    "weight_decay": "weight_decay", "grad_clip": "grad_clip", "ema_decay": "ema_decay", "warmup": "warmup_steps",
    "iso_lambda": "iso_lambda", "iso_mode": "iso_mode", "timesteps": "timesteps", "schedule": "schedule", "T": "T",
    "seed": "seed",
    "log_every": "log_every", "ckpt_every": "ckpt_every", "sample_every": "sample_every",
    "precision": "precision", "channels_last": "channels_last", "compile": "compile", "logger": "logger",
}


class _Given(argparse.Action):
    """Store the option's value and note that it was given: on --resume, options not given keep the run's."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)
        namespace.given = getattr(namespace, "given", frozenset()) | {self.dest}


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


def build_model_and_data(args: argparse.Namespace, spec: dict | None = None):
    """(model, data, sample_shape, data record) for the parsed arguments; the model is built after seeding.

    ``spec``: a resumed run's recorded model (`isofast.models.build_model`), built instead of the options'.
    """
    import torch

    from ..models.registry import MODELS_2D, build_model

    toy, images = _toy2d_names(), _image_names()
    if args.data not in toy + images:
        raise ValueError(f"unknown --data {args.data!r}; 2D datasets: {', '.join(toy)}; image datasets: {', '.join(images)}")
    recorded = build_model(spec) if spec else None  # checked and sized before anything else is built
    model_kind = spec["kind"] if spec else _kind(args.model) or ("mlp" if args.data in toy else "unet")
    if args.model_config is not None and model_kind != "diffusers_unet2d":
        raise ValueError(f"--model-config applies to --model diffusers-unet2d, not to the {model_kind} model")
    if model_kind == "diffusers_unet2d":
        if args.data not in images:
            raise ValueError(f"--model diffusers-unet2d trains on images ({', '.join(images)}), got --data {args.data}")
        return _diffusers_unet2d_and_data(args, recorded)
    if model_kind in MODELS_2D:
        if args.data not in toy:
            raise ValueError(f"--model {model_kind} trains on 2D data ({', '.join(toy)}), got --data {args.data}")
        from ..data.toy2d import make_dataset

        data = make_dataset(args.data, n_points=args.n_points, seed=args.seed, noise=args.data_noise)
        torch.manual_seed(args.seed)
        model = recorded or MODELS_2D[model_kind](data_dim=data.shape[1], hidden=args.mlp_hidden,
                                                  n_layers=args.mlp_layers)
        record = {"name": args.data, "n_points": args.n_points}
        if args.data_noise is not None:  # recorded only when set, so earlier runs' records still match
            record["noise"] = args.data_noise
        return model, data, tuple(data.shape[1:]), record
    if args.data not in images:
        raise ValueError(f"--model unet trains on images ({', '.join(images)}), got --data {args.data}")
    from ..data.images import make_image_dataset
    from ..models.unet import UNET_CONFIGS, UNet

    if recorded is not None:
        config = recorded.config
    else:
        name = args.config or ("digits8" if args.data == "digits" and "digits8" in UNET_CONFIGS else "flowers64")
        if name not in UNET_CONFIGS:
            raise ValueError(f"unknown --config {name!r}; known: {', '.join(sorted(UNET_CONFIGS))}")
        config = UNET_CONFIGS[name]
    size = config.image_size if recorded is not None else args.image_size or config.image_size
    dataset = make_image_dataset(args.data, root=args.data_root, image_size=size, download=args.download)
    channels = int(dataset[0].shape[0]) if isinstance(dataset[0], torch.Tensor) else int(dataset[0][0].shape[0])
    data_record = {"name": args.data, "image_size": size}
    if recorded is not None:
        if channels != config.in_channels:
            raise ValueError(f"--data {args.data} has {channels} channels; the run's model takes {config.in_channels}")
        return recorded, dataset, (channels, size, size), data_record
    overrides = {}
    if size != config.image_size:
        overrides["image_size"] = size
    if channels != config.in_channels:
        overrides["in_channels"] = channels  # the data decides the channels, the config the architecture
    if overrides:
        print(f"isofast train: UNet config {name!r} with {overrides} to fit the data", file=sys.stderr)
        config = dataclasses.replace(config, **overrides)
    torch.manual_seed(args.seed)
    return UNet(config), dataset, (channels, size, size), data_record


def _kind(model_option: str | None) -> str | None:
    """The model spec kind of a --model choice (diffusers-unet2d -> diffusers_unet2d)."""
    return model_option and model_option.replace("-", "_")


def _diffusers_unet2d_and_data(args: argparse.Namespace, recorded):
    """(model, data, sample_shape, data record) of a diffusers UNet2DModel: the --model-config JSON's (or the
    resumed run's) architecture; the data is loaded at its sample_size with its in_channels."""
    import torch

    from ..data.images import make_image_dataset
    from ..diffusers_bridge.models import DiffusersUNet2D, check_timesteps, load_unet2d_config, unet2d_sample_shape

    if args.config is not None:
        raise ValueError(f"--config {args.config} names an isofast UNet config; --model diffusers-unet2d takes its "
                         "architecture from --model-config CFG.json")
    if recorded is not None:
        config, source = recorded.config, "the run's UNet2DModel config"
    elif args.model_config is None:
        raise ValueError("--model diffusers-unet2d needs --model-config CFG.json, a UNet2DModel config "
                         "(sample_size, in_channels, out_channels, block_out_channels, ...)")
    else:
        config, source = load_unet2d_config(args.model_config), f"--model-config {args.model_config}"
    channels, height, width = unet2d_sample_shape(config)
    if height != width:
        raise ValueError(f"{source}: sample_size {[height, width]} is not square; isofast's image data is")
    if config.get("out_channels", 3) != channels:
        raise ValueError(f"{source}: out_channels {config.get('out_channels', 3)} must equal in_channels {channels} "
                         "(the model predicts the noise of its input)")
    if args.image_size is not None and args.image_size != height:
        raise ValueError(f"--image-size {args.image_size} differs from {source}'s sample_size {height}")
    check_timesteps(config, args.T, "--T", source)
    if args.data == "digits" and channels != 1:
        raise ValueError(f"--data digits has 1 channel; {source} has in_channels {channels}")
    dataset = make_image_dataset(args.data, root=args.data_root, image_size=height, download=args.download,
                                 channels=channels)
    if recorded is None:
        torch.manual_seed(args.seed)
    model = recorded or DiffusersUNet2D(config)
    return model, dataset, (channels, height, width), {"name": args.data, "image_size": height}


# ----- --resume: the run's own model, data and settings ----------------------------------------------------
def recorded_run(args: argparse.Namespace) -> dict | None:
    """The state.json fields (config, model_spec, step, ...) of the checkpoint ``--resume`` continues (None: a
    fresh run)."""
    from ..checkpoint import CheckpointError, checkpoint_meta
    from ..resume import checkpoint_to_resume, with_recovery_hint

    if args.resume is None:
        return None
    source, _ = checkpoint_to_resume(Path(args.out) / "checkpoints", args.resume)
    if source is None:
        return None
    meta = with_recovery_hint(checkpoint_meta, source, Path(args.out))
    meta["path"] = source
    if not isinstance(meta.get("model_spec"), dict):
        raise CheckpointError(f"{source / 'state.json'} records no model_spec: isofast train cannot rebuild its model")
    return meta


def apply_recorded_settings(args: argparse.Namespace, record: dict) -> None:
    """Give every run option not given on the command line the value the run recorded, and refuse model
    options that ask for another model than the recorded one."""
    given = args.given
    config = record.get("config", {})
    for dest, field in _RUN_OPTIONS.items():
        if dest not in given and field in config:
            setattr(args, dest, config[field])
    data = config.get("data") or {}
    for dest, key in (("data", "name"), ("n_points", "n_points"), ("data_noise", "noise")):
        if dest not in given and key in data:
            setattr(args, dest, data[key])
    conflicts = _model_conflicts(args, record["model_spec"])
    if conflicts:
        raise ValueError(f"--resume rebuilds the model the run recorded ({record['path'] / 'state.json'}, also "
                         f"{Path(args.out) / 'model.json'}), but {'; '.join(conflicts)}: leave these options "
                         "out, or train the other model in a new --out")


def _model_conflicts(args: argparse.Namespace, spec: dict) -> list[str]:
    given, kind, recorded = args.given, spec.get("kind"), spec.get("config", {})
    conflicts = []
    if "model" in given and _kind(args.model) != kind:
        conflicts.append(f"--model {args.model} asks for another kind (the run's is {kind})")
    if "model_config" in given and kind == "diffusers_unet2d":
        from ..diffusers_bridge.models import load_unet2d_config

        asked = load_unet2d_config(args.model_config)
        differ = [f"{k} {v} vs the run's {recorded.get(k)}" for k, v in asked.items()
                  if not k.startswith("_") and v != recorded.get(k)]
        if differ:
            conflicts.append(f"--model-config {args.model_config} differs: {', '.join(differ)}")
    if "config" in given:
        from ..models.unet import UNET_CONFIGS

        if args.config not in UNET_CONFIGS:
            raise ValueError(f"unknown --config {args.config!r}; known: {', '.join(sorted(UNET_CONFIGS))}")
        named = json.loads(json.dumps(dataclasses.asdict(UNET_CONFIGS[args.config])))
        differ = [f"{k} {named[k]} vs the run's {recorded.get(k)}" for k in named
                  if k not in ("image_size", "in_channels") and named[k] != recorded.get(k)]
        if kind != "unet" or differ:
            conflicts.append(f"--config {args.config} differs: " + (", ".join(differ) if kind == "unet" else
                                                                   f"the run's model is a {kind}"))
    for dest, key in (("mlp_hidden", "hidden"), ("mlp_layers", "n_layers"), ("image_size", "image_size")):
        if dest in given and getattr(args, dest) != recorded.get(key):
            conflicts.append(f"--{dest.replace('_', '-')} {getattr(args, dest)} differs from the run's "
                             f"{key} {recorded.get(key)}")
    return conflicts


def train_config(args: argparse.Namespace, data_record: dict, record: dict | None) -> TrainConfig:
    """The run's `TrainConfig`: the options, and on --resume the recorded settings no option sets."""
    values = {field: getattr(args, dest) for dest, field in _RUN_OPTIONS.items()}
    values["grad_clip"] = values["grad_clip"] or None
    values["data"] = data_record
    machine = dict(out_dir=args.out, device=args.device, backend=args.backend, num_workers=args.num_workers,
                   progress=show_progress(args.no_progress))
    if record is not None:  # fields no option sets (betas, keep_checkpoints, ...: a run made through the API)
        recorded = record.get("config", {})
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        values.update({k: v for k, v in recorded.items() if k in known and k not in values and k not in machine})
    return TrainConfig(**machine, **values)


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
    """Train as the arguments say. Bad input raises (ValueError, OSError, a missing extra's ImportError):
    `isofast.cli.main` reports it in one line, or with its traceback under ``--debug``."""
    from ..resume import check_override
    from ..train import Trainer
    from ..train_loggers import require_wandb

    if args.override and args.resume is None:
        raise ValueError("--override applies to --resume only")
    check_override(args.override)
    record = recorded_run(args)
    if record is not None:
        apply_recorded_settings(args, record)
    model, data, sample_shape, data_record = build_model_and_data(args, record and record["model_spec"])
    config = train_config(args, data_record, record)
    if config.logger == "wandb":
        require_wandb()  # before anything trains
    sample_fn = None
    if args.sample_every:
        count = args.sample_count or (2000 if len(sample_shape) == 1 else 64)
        sample_fn, holder = make_sample_fn(sample_shape, count, args.seed, args.backend)
    trainer = Trainer(model, data, config, sample_fn=sample_fn)
    if sample_fn is not None:
        holder["schedule"] = trainer.schedule
    try:
        trainer.fit(resume=args.resume if args.resume is not None else False, override=args.override)
    finally:
        trainer.close()
    if trainer.dist.is_main:
        print(f"isofast train: {trainer.steps_trained} steps trained, {trainer.step} in all; run folder "
              f"{config.out_dir} (logger: {trainer.logger_status})", file=sys.stderr)
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a DDPM / Iso-Diffusion model (one process or under torchrun)",
        description=__doc__, formatter_class=HelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", action=_Given, choices=("mlp", "authors_mlp", "unet", "diffusers-unet2d"), default=None,
                   help="mlp (isofast's TimeMLP) or authors_mlp (the Iso-Diffusion authors' 2024 MLP) for 2D data, "
                        "unet for images, diffusers-unet2d (a diffusers UNet2DModel built from --model-config; "
                        "needs diffusers) (default: mlp for 2D data, unet for images)")
    g.add_argument("--model-config", action=_Given, default=None, metavar="CFG.json",
                   help="a local UNet2DModel config JSON for --model diffusers-unet2d (its sample_size and "
                        "in_channels set the image size and channels; its num_train_timesteps, if set, must equal "
                        "--T; nothing is downloaded; default: none)")
    g.add_argument("--config", action=_Given, default=None, help="UNet config name (isofast.models.unet.UNET_CONFIGS; default: "
                   "digits8 for digits, else flowers64)")
    g.add_argument("--data", action=_Given, default="digits", help="a 2D dataset (swiss_roll, moon_scatter, moon_circles, "
                   "central_banana, moons, circles, gaussians8) or images (digits, flowers102, pets, folder); "
                   "digits (scikit-learn's 8x8 digits) needs no download")
    g.add_argument("--data-root", default=None, help="folder holding the image dataset (or the images, for folder; "
                   "default: none, needed except for digits and 2D data)")
    g.add_argument("--download", action="store_true", help="download flowers102/pets into --data-root")
    g.add_argument("--image-size", action=_Given, type=_positive_int, default=None, help="image side (default: the config's)")
    g.add_argument("--n-points", action=_Given, type=_positive_int, default=10000, help="points of a 2D dataset")
    g.add_argument("--data-noise", action=_Given, type=_non_negative_float, default=None,
                   help="data noise of a 2D dataset that has one (default: the dataset's own)")
    g.add_argument("--mlp-hidden", action=_Given, type=_positive_int, default=128, help="width of the 2D MLP")
    g.add_argument("--mlp-layers", action=_Given, type=_positive_int, default=3, help="hidden layers of the 2D MLP")

    g = p.add_argument_group("objective and optimisation")
    g.add_argument("--iso-lambda", action=_Given, type=_non_negative_float, default=DEFAULT_ISO_LAMBDA,
                   help="isotropy penalty weight λ (>= 0); 0 trains plain DDPM")
    g.add_argument("--iso-mode", action=_Given, choices=("batch", "sample"), default="batch",
                   help="batch: the paper's penalty on the batch mean; sample: one penalty per sample")
    g.add_argument("--timesteps", action=_Given, choices=("per-sample", "per-batch"), default="per-sample",
                   help="per-sample: one t per sample (DDPM); per-batch: one t shared by the whole batch (what the "
                        "authors' 2024 loop did in effect)")
    g.add_argument("--schedule", action=_Given, choices=SCHEDULES, default="linear", help="beta schedule")
    g.add_argument("--T", action=_Given, type=_positive_int, default=1000, help="diffusion steps")
    g.add_argument("--steps", action=_Given, type=_positive_int, default=10000, help="optimizer steps in all")
    g.add_argument("--batch-size", action=_Given, type=_positive_int, default=64,
                   help="samples per forward/backward pass, over all processes (split over them); with --grad-accum N "
                        "an optimizer step sees N such batches")
    g.add_argument("--grad-accum", action=_Given, type=_positive_int, default=1, metavar="N",
                   help="gradient accumulation: N passes of --batch-size per optimizer step, their gradients averaged "
                        "(accelerate's gradient_accumulation_steps; --batch-size is per pass); the step count, LR "
                        "warm-up and EMA advance once per step; --iso-mode batch penalises each pass's batch")
    g.add_argument("--lr", action=_Given, type=float, default=1e-3, help="learning rate")
    g.add_argument("--optimizer", action=_Given, choices=OPTIMIZERS, default="adam", help="optimizer")
    g.add_argument("--weight-decay", action=_Given, type=_non_negative_float, default=0.0, help="weight decay")
    g.add_argument("--grad-clip", action=_Given, type=_non_negative_float, default=1.0, help="max grad norm (0: off)")
    g.add_argument("--ema-decay", action=_Given, type=_non_negative_float, default=0.999, help="0: no EMA")
    g.add_argument("--warmup", action=_Given, type=_non_negative_int, default=0, help="LR warm-up steps")
    g.add_argument("--seed", action=_Given, type=_non_negative_int, default=0,
                   help="seed of the weights, data order and noise")

    g = p.add_argument_group("speed")
    g.add_argument("--precision", action=_Given, choices=PRECISIONS, default="fp32",
                   help="bf16: autocast of the model; fp16: autocast with a loss scaler (torch.amp.GradScaler; a "
                        "step whose gradients overflow is skipped and counted in metrics.csv's skipped_steps; on a CPU bf16 is "
                        "the faster choice)")
    g.add_argument("--channels-last", action=_Given, nargs=0, const=True, default=False, help="NHWC memory format")
    g.add_argument("--compile", action=_Given, nargs=0, const=True, default=False, help="torch.compile the model")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    g.add_argument("--backend", default=None, help="isofast op backend (default: auto)")
    g.add_argument("--num-workers", type=_non_negative_int, default=0, help="DataLoader workers (image data)")

    g = p.add_argument_group("run folder")
    g.add_argument("--out", required=True, help="run folder: config, metrics.csv, TensorBoard, checkpoints, samples")
    g.add_argument("--resume", nargs="?", const=True, default=None, metavar="PATH",
                   help="continue the newest complete checkpoint of --out (or the checkpoint at PATH) with the "
                   "run's recorded model, data and settings (options left out keep the run's values; default: a new run)")
    g.add_argument("--override", action="append", default=[], metavar="KEY",
                   help="with --resume: let the run setting KEY (a config.json field: lr, iso_lambda, seed, data, ...) "
                   "differ from the run's; repeatable; recorded in the run's history.jsonl (default: none)")
    g.add_argument("--log-every", action=_Given, type=_positive_int, default=50, help="steps per metrics.csv row")
    g.add_argument("--ckpt-every", action=_Given, type=_positive_int, default=1000, help="steps per checkpoint")
    g.add_argument("--sample-every", action=_Given, type=_non_negative_int, default=0, help="sample grid every N steps (0: off)")
    g.add_argument("--sample-count", type=_positive_int, default=None,
                   help="samples per grid (default 64 images / 2000 points)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (none is drawn when stderr is not "
                   "a terminal)")
    g.add_argument("--logger", action=_Given, choices=LOGGERS, default="tensorboard",
                   help="where metrics go besides metrics.csv (always written): tensorboard (events in --out), wandb "
                        "(a Weights & Biases run in --out/wandb; pip install wandb; WANDB_MODE=offline needs no "
                        "network) or csv (nowhere else)")
    g.add_argument("--no-tensorboard", dest="logger", action=_Given, nargs=0, const="csv",
                   help="the same as --logger csv")
    p.set_defaults(func=run, given=frozenset())
