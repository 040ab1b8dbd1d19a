"""`TrainConfig`: every option of a training run, checked, and saved as the run's ``config.json``."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import InitVar, dataclass

from .schedule_names import SCHEDULES

__all__ = ["ISO_MODES", "LOGGERS", "OPTIMIZERS", "PRECISIONS", "TIMESTEP_MODES", "TrainConfig"]

OPTIMIZERS = ("adam", "adamw")
PRECISIONS = ("fp32", "bf16", "fp16")  # fp16: autocast + a GradScaler (`isofast.train_precision`)
LOGGERS = ("tensorboard", "wandb", "csv")  # metrics.csv is always written; the others add their own records
ISO_MODES = ("batch", "sample")
TIMESTEP_MODES = ("per-sample", "per-batch")  # one t per sample (DDPM), or one t per batch (`draw_timesteps`)


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved as ``out_dir/config.json``.

    out_dir: run folder (config.json, metrics.csv, TensorBoard events, checkpoints/, samples/).
    steps: optimizer steps to train for (the total, also when resuming).
    batch_size: global batch of one forward/backward pass, a micro-batch (each of W ranks trains on
        batch_size / W samples of it).
    grad_accum: micro-batches per optimizer step (>= 1): each step averages the gradients of grad_accum
        micro-batches of batch_size, so it sees batch_size * grad_accum samples (as accelerate's
        ``gradient_accumulation_steps`` with a per-pass batch). The batch isotropy penalty (iso_mode "batch")
        is that of each micro-batch, not of the step's whole batch; every per-sample term is exact.
    lr, optimizer ("adam" | "adamw"), weight_decay, betas, adam_eps: the optimizer (fused on CUDA).
    grad_clip: max global grad norm (None or 0: no clipping).
    ema_decay: EMA decay of the weights (0: no EMA; then ``ema_model`` is the model itself);
        ema_warmup: use min(ema_decay, (1 + k)/(10 + k)) after step k (see `isofast.ema.EMA`).
    warmup_steps: linear LR warm-up, lr_k = lr * min(1, (k + 1) / warmup_steps) for step k.
    iso_lambda, iso_mode: the Iso-Diffusion penalty weight (>= 0; 0 is plain DDPM) and mode.
    timesteps: "per-sample" (each row its own t, DDPM) or "per-batch" (one t for the whole batch: with grad_accum,
        the optimizer step's, shared by its micro-batches).
    schedule ("linear" | "cosine" | "scaled_linear"), T: the noise schedule.
    seed: seeds data order, timesteps, noise and torch's global RNG.
    log_every, ckpt_every (a checkpoint is always written at the end), keep_checkpoints (>= 1),
    sample_every (0: never; needs a ``sample_fn``): in steps.
    precision: "fp32", "bf16" (autocast of the model's forward, on CUDA and CPU) or "fp16" (autocast with a
        ``torch.amp.GradScaler``: a step whose gradients overflow is skipped and the scale lowered; CUDA).
    channels_last: NHWC memory format for 4-D image models. compile: ``torch.compile`` the model.
    device: "auto" (cuda:<local rank> if available, else CPU), "cpu", "cuda", "cuda:1", ...
    backend: isofast op backend (None: auto; see `isofast.ops.backends`).
    num_workers: DataLoader workers for Dataset data (tensor data needs none).
    progress: tqdm bar (only on a terminal).
    logger: where the metrics go besides ``metrics.csv`` (always written): "tensorboard" (events next to it),
        "wandb" (a Weights & Biases run under ``out_dir/wandb``; needs ``pip install wandb``; ``WANDB_MODE=offline``
        works without network) or "csv" (nothing else). ``tensorboard`` (init only, kept for older callers):
        True is logger "tensorboard", False "csv".
    data: what the data is, for the record (JSON; `isofast train` stores {"name", "n_points"} for 2D sets and
        {"name", "image_size"} for images; None: not described). A resume on other data is refused.

    A resume keeps every field except `isofast.resume.FREE_FIELDS` unless told otherwise (`isofast.resume`).
    """

    out_dir: str
    steps: int
    batch_size: int = 64
    grad_accum: int = 1
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    grad_clip: float | None = 1.0
    ema_decay: float = 0.999
    ema_warmup: bool = True
    warmup_steps: int = 0
    iso_lambda: float = 0.0
    iso_mode: str = "batch"
    timesteps: str = "per-sample"
    schedule: str = "linear"
    T: int = 1000
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 1000
    keep_checkpoints: int = 2
    sample_every: int = 0
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    device: str = "auto"
    backend: str | None = None
    num_workers: int = 0
    progress: bool = True
    logger: str = "tensorboard"
    data: dict | None = None
    tensorboard: InitVar[bool | None] = None

    def __post_init__(self, tensorboard: bool | None) -> None:
        self.out_dir = str(self.out_dir)
        if tensorboard is not None:  # the switch before `logger`: True is "tensorboard", False "csv"
            if not isinstance(tensorboard, bool):
                raise TypeError(f"TrainConfig.tensorboard must be a bool, got {type(tensorboard).__name__}")
            if self.logger not in ("tensorboard", "csv"):
                raise ValueError(f"TrainConfig.tensorboard={tensorboard} contradicts logger={self.logger!r}: pass "
                                 "logger alone")
            self.logger = "tensorboard" if tensorboard else "csv"
        self.betas = tuple(float(b) for b in self.betas)  # lists from JSON
        self.validate()

    def validate(self) -> None:
        """Raise ValueError/TypeError naming the first bad field."""
        def integer(name: str, low: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"TrainConfig.{name} must be an int, got {type(v).__name__}")
            if v < low:
                raise ValueError(f"TrainConfig.{name} must be >= {low}, got {v}")

        def real(name: str, low: float, high: float = math.inf, low_open: bool = False) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"TrainConfig.{name} must be a float, got {type(v).__name__}")
            if not math.isfinite(v) or v < low or v > high or (low_open and v == low):
                raise ValueError(f"TrainConfig.{name} must be finite and in {'(' if low_open else '['}{low}, {high}], got {v}")

        def choice(name: str, allowed: tuple[str, ...]) -> None:
            if getattr(self, name) not in allowed:
                raise ValueError(f"TrainConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")

        if not self.out_dir:
            raise ValueError("TrainConfig.out_dir must be a non-empty path")
        integer("steps", 1)
        integer("batch_size", 1)
        integer("grad_accum", 1)
        real("lr", 0.0, low_open=True)
        choice("optimizer", OPTIMIZERS)
        real("weight_decay", 0.0)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"TrainConfig.betas must be two floats in [0, 1), got {self.betas}")
        real("adam_eps", 0.0, low_open=True)
        if self.grad_clip is not None:
            real("grad_clip", 0.0)
        real("ema_decay", 0.0, 1.0)
        if self.ema_decay == 1.0:
            raise ValueError("TrainConfig.ema_decay must be < 1 (0 turns EMA off), got 1.0")
        integer("warmup_steps", 0)
        real("iso_lambda", 0.0)
        choice("iso_mode", ISO_MODES)
        choice("timesteps", TIMESTEP_MODES)
        choice("schedule", SCHEDULES)
        integer("T", 1)
        integer("seed", 0)
        for name in ("log_every", "ckpt_every", "keep_checkpoints"):
            integer(name, 1)
        integer("sample_every", 0)
        choice("precision", PRECISIONS)
        choice("logger", LOGGERS)
        integer("num_workers", 0)
        if self.data is not None and not isinstance(self.data, dict):
            raise TypeError(f"TrainConfig.data must be a dict describing the data or None, got {type(self.data).__name__}")
        if not isinstance(self.device, str):
            raise TypeError(f"TrainConfig.device must be a str, got {type(self.device).__name__}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)} | {"tensorboard"}  # config.json of older runs
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}")
        return cls(**d)
