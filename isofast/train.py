"""The trainer shared by every isofast model: one process, or many under torchrun.

One optimizer step on a global batch of A = N B samples x0 (A, ...) of n elements each, N = grad_accum
micro-batches of B = batch_size::

    t ~ U{0..T-1} (A,) (or one t for the step),  key = NoiseKey.draw(x0.shape)             (the trainer's noise generator)
    for each micro-batch m (rows [m B, (m+1) B) of x0, of t and of the draw):
        x_t, key_m = q_sample(x0_m, t_m, sched, key_m)              (fused: eps generated in-kernel)
        eps_pred = model(x_t, t_m)                                  (bf16/fp16 autocast if asked)
        loss, parts = iso_ddpm_loss(eps_pred, key_m, iso_lambda, iso_mode, return_parts=True)
        (loss / N).backward()                                       (fp16: the scaled loss; DDP: no_sync but the last)
    clip grad norm; lr warm-up; optimizer.step() (fp16: skipped if gradients overflowed); EMA update

So the gradient is the mean over the A samples, as one pass over a batch of A would give for every per-sample
term (mse, the "sample" isotropy penalty); the "batch" penalty is that of each micro-batch of B, averaged.
The data order, t and noise of a step are those of one batch of A, whatever N: a run with N micro-batches of
B and one with 1 of N B see the same samples, timesteps and noise. The step count, LR schedule and EMA
advance once per optimizer step. Mixed precision and the fp16 loss scaler: `isofast.train_precision`.

`Trainer.fit` runs the phases of a run in order: set-up (run folder, seeds), resume (a checkpoint), the
loop (a step; every few steps the stats, a sample grid, a snapshot), the end (the last of each). Its
options are a `TrainConfig` (`isofast.train_config`); its statistics go to metrics.csv and the configured
logger (`isofast.train_stats`, `isofast.train_loggers`); its snapshots are checkpoints (`isofast.checkpoint`).

Randomness, and why resume is exact. Three streams, all restored from a checkpoint:

* data order: step s's global batch is a pure function of (seed, s) (`isofast.data.order`), so it needs
  no saved state (resuming mid-epoch costs nothing, whatever the world size);
* t and noise keys: one CPU ``torch.Generator`` seeded from ``seed`` (`make_noise_generator`), saved;
* the fp16 loss scale and its growth counter: saved;
* torch's global RNG (dropout, random flips with ``num_workers=0``), numpy's and Python's: saved (per
  rank; a resume with another world size restores rank 0's and reseeds the others from (seed, rank, step)).

On CPU a run stopped after step k and resumed ends with weights bitwise equal to an uninterrupted run.

Many processes (torchrun): every rank draws the same global batch indices, t and key from identically
seeded generators and trains on its rows ``[r B/W, (r+1) B/W)``, its noise a slice of the global draw;
DDP averages the gradients, and the batch isotropy penalty is the global batch's (`isofast.distributed`
says why both are exact). So W processes give the weights of one process on the same global batch (up to
float summation order). Only rank 0 writes logs, grids and checkpoints; checkpoints hold the unwrapped
module, so resume works with any world size.

Datasets with random augmentation and ``num_workers > 0``: worker RNGs are seeded per (seed, rank, step
the loader started at), so a resumed run sees different flips than an uninterrupted one (weights then
match statistically, not bitwise). Tensor datasets and ``num_workers=0`` are exact.
"""
from __future__ import annotations

import contextlib
import json
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from . import checkpoint as ckpt_io
from . import distributed
from . import resume as resume_io
from .data.order import (
    EpochOrder,
    draw_timesteps,
    first_item,
    global_seed,
    make_noise_generator,
    seed_global_rngs,
    step_batches,
)
from .diffusers_bridge.models import check_timesteps
from .ema import EMA
from .io import atomic_write_text, check_writable_dir
from .models.registry import model_spec_of
from .noise import NoiseKey
from .ops import iso_ddpm_loss, q_sample
from .plots import write_samples
from .reference import LossParts
from .schedule import NoiseSchedule
from .train_config import TrainConfig
from .train_loggers import require_wandb
from .train_precision import MixedPrecision
from .train_stats import TrainStats

__all__ = ["TrainConfig", "Trainer"]


class Trainer:
    """Train ``model`` (``model(x_t, t) -> eps_pred``) on ``data`` with the Iso-Diffusion objective.

    data: a float tensor (N, ...) of samples (moved to the training device once and batched in-process,
    the fast path for 2D data) or a ``torch.utils.data.Dataset`` of samples (read by a DataLoader; items
    may be tensors or tuples whose first item is the sample).
    sample_fn(ema_model, step) -> samples, called every ``sample_every`` steps and at the end on rank 0
    (under a forked RNG, so it cannot change training): (B, C, H, W) images in [-1, 1] are written as a PNG
    grid, (B, 2) points as a scatter plot, to ``out_dir/samples/step_XXXXXXX.png``.
    model_spec: JSON description of the architecture stored in checkpoints (default:
    `isofast.models.model_spec_of`) so `isofast.checkpoint.load_trained_model` can rebuild it.

    Attributes: ``model`` (the unwrapped module, trained in place), ``ema_model``, ``step`` (optimizer
    steps done, skipped fp16 steps included), ``steps_trained`` (by the last `fit`), ``schedule``
    (`NoiseSchedule` on the device), ``optimizer``, ``precision`` (`MixedPrecision`: autocast, fp16 scaler),
    ``dist`` (`DistInfo`), ``device``, ``out_dir``.
    """

    def __init__(
        self,
        model: nn.Module,
        data: Dataset | torch.Tensor,
        config: TrainConfig,
        sample_fn: Callable[[nn.Module, int], torch.Tensor] | None = None,
        model_spec: dict | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        if not isinstance(data, (torch.Tensor, Dataset)):
            raise TypeError(f"data must be a torch.Tensor or a torch.utils.data.Dataset, got {type(data).__name__}")
        if sample_fn is not None and not callable(sample_fn):
            raise TypeError("sample_fn must be callable(model, step) -> tensor")
        if config.sample_every and sample_fn is None:
            warnings.warn("TrainConfig.sample_every is set but no sample_fn was given: no samples will be written",
                          RuntimeWarning, stacklevel=2)
        config.validate()
        check_timesteps(model, config.T, "TrainConfig.T")
        self.config = config
        self.sample_fn = sample_fn
        self.out_dir = Path(config.out_dir)
        self.dist = distributed.init_from_env(config.device)
        self.device = self.dist.device
        # This rank's rows of each micro-batch, as rows of the step's global batch (`distributed.micro_batch_rows`).
        self.micro_rows = distributed.micro_batch_rows(config.batch_size, config.grad_accum, self.dist.rank,
                                                       self.dist.world_size)
        self.precision = MixedPrecision(config.precision, self.device)
        if config.precision == "fp16" and self.device.type == "cpu":
            warnings.warn("precision='fp16' (--precision fp16) on a CPU runs, but float16 there can be many times "
                          "slower than fp32 (image UNets above all); bf16 is the CPU choice",
                          RuntimeWarning, stacklevel=2)
        if config.logger == "wandb" and self.dist.is_main:
            require_wandb()  # asked for by name: refuse now, not after the run folder is set up

        self._set_data(data)
        self.model = model.to(self.device)
        if config.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.model_spec = model_spec if model_spec is not None else model_spec_of(model)
        self.schedule = NoiseSchedule.from_name(config.schedule, config.T).to(self.device)
        self.ema = EMA(self.model, config.ema_decay, config.ema_warmup) if config.ema_decay > 0 else None
        self.optimizer = self._make_optimizer()
        self.noise_generator = make_noise_generator(config.seed)
        self.step = 0

        self._forward: Callable = self.model
        self._ddp = None
        if self.dist.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self._forward = self._ddp = DistributedDataParallel(self.model, device_ids=ids)
        if config.compile:
            self._forward = torch.compile(self._forward)
        self._global_iso = self.dist.distributed and config.iso_mode == "batch" and config.iso_lambda > 0
        self.stats = TrainStats(self.out_dir, self.device, config.batch_size * config.grad_accum, self.dist.is_main)
        self._last_saved = -1
        self.steps_trained = 0

    # ----- set-up ------------------------------------------------------------------------------------
    def _set_data(self, data: Dataset | torch.Tensor) -> None:
        cfg = self.config
        step_batch = cfg.batch_size * cfg.grad_accum
        size = data.shape[0] if isinstance(data, torch.Tensor) else len(data)
        if cfg.grad_accum > 1 and size < step_batch:
            raise ValueError(f"batch_size * grad_accum = {cfg.batch_size} * {cfg.grad_accum} = {step_batch} (one "
                             f"optimizer step's batch) exceeds the dataset size {size}")
        if isinstance(data, torch.Tensor):
            if not data.is_floating_point() or data.ndim < 2:
                raise ValueError(f"tensor data must be a float tensor (N, ...) with N samples, got {data.dtype} "
                                 f"of shape {tuple(data.shape)}")
            self._order = EpochOrder(data.shape[0], step_batch, cfg.seed)
            self._data = data.to(self.device, torch.float32)
            self.sample_shape = tuple(data.shape[1:])
        else:
            self._order = EpochOrder(len(data), step_batch, cfg.seed)
            self._data = data
            self.sample_shape = tuple(first_item(data[0]).shape)

    @property
    def ema_model(self) -> nn.Module:
        """The EMA copy of the model (the model itself when EMA is off)."""
        return self.ema.module if self.ema is not None else self.model

    @property
    def tensorboard_status(self) -> str:
        """"off", "on", or "unavailable (why)": whether `fit` writes TensorBoard events."""
        return self.stats.tensorboard_status

    @property
    def logger_status(self) -> str:
        """Where `fit` logs besides metrics.csv: "csv" (nowhere), "tensorboard on", "wandb on", ..."""
        return self.stats.logger_status

    def _make_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.config
        cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters")
        kwargs = dict(lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
        if self.device.type == "cuda":
            kwargs["fused"] = True  # one kernel for all parameters: the fastest AdamW on GPUs
        return cls(params, **kwargs)

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then constant."""
        warm = self.config.warmup_steps
        return self.config.lr * min(1.0, (step + 1) / warm) if warm else self.config.lr

    # ----- one step ----------------------------------------------------------------------------------
    def _noise_for_step(self, sample_shape: tuple[int, ...]) -> tuple[torch.Tensor, NoiseKey]:
        """(t (A,) on the CPU, key (A, ...)): the timesteps and noise of the step's global batch of A rows,
        the same on every rank (identically seeded generators)."""
        cfg = self.config
        rows = cfg.batch_size * cfg.grad_accum
        t_global = draw_timesteps(cfg.T, rows, cfg.timesteps, self.noise_generator)
        key = NoiseKey.draw((rows, *sample_shape), torch.float32, self.device, self.noise_generator)
        return t_global, key

    def _micro_batch_noise(self, t_global: torch.Tensor, key: NoiseKey,
                           rows: slice) -> tuple[torch.Tensor, NoiseKey | torch.Tensor]:
        """(t, noise) of ``rows`` of the step's draw: a key where the rows allow, else the tensor (`rank_noise`)."""
        # t stays on the CPU: q_sample checks CPU timesteps without a device sync and copies them over.
        t = t_global[rows]
        if self.device.type == "cuda":
            t = t.pin_memory()
        whole = rows.start == 0 and rows.stop == key.shape[0]
        return t, key if whole else distributed.rank_noise(key, rows)

    def _loss(self, eps_pred: torch.Tensor, noise: NoiseKey | torch.Tensor) -> tuple[torch.Tensor, LossParts]:
        cfg = self.config
        if self._global_iso:  # DDP + batch penalty: the penalty of the *global* (micro-)batch mean
            return distributed.global_batch_iso_loss(eps_pred, noise, cfg.iso_lambda, cfg.backend)
        return iso_ddpm_loss(eps_pred, noise, cfg.iso_lambda, cfg.iso_mode, return_parts=True, backend=cfg.backend)

    def _gradient_sync(self, last: bool):
        """DDP all-reduces gradients in the backward of the last micro-batch only (``no_sync`` before it)."""
        if self._ddp is None or last:
            return contextlib.nullcontext()
        return self._ddp.no_sync()

    def _micro_step(self, x0: torch.Tensor, t_cpu: torch.Tensor, noise: NoiseKey | torch.Tensor,
                    last: bool) -> tuple[torch.Tensor, LossParts]:
        """Forward and backward of one micro-batch (its gradients, divided by grad_accum, add to .grad)."""
        cfg = self.config
        # The returned noise is what the loss reads: on a CPU the key carries the draw (NoiseKey.kept).
        x_t, noise = q_sample(x0, t_cpu, self.schedule, noise, backend=cfg.backend)
        t = t_cpu.to(self.device, non_blocking=True)
        if cfg.channels_last and x_t.ndim == 4:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        with self._gradient_sync(last):
            with self.precision.autocast():
                eps_pred = self._forward(x_t, t)
            loss, parts = self._loss(eps_pred, noise)
            self.precision.backward(loss / cfg.grad_accum)  # x / 1 is x exactly: no accumulation, no change
        return loss.detach(), parts

    def train_step(self, x0: torch.Tensor) -> None:
        """One optimizer step on this rank's rows x0 (grad_accum * B/W, ...) of the step's global batch (the
        data iterator supplies them micro-batch after micro-batch)."""
        cfg = self.config
        t_global, key = self._noise_for_step(tuple(x0.shape[1:]))
        per_micro = x0.shape[0] // cfg.grad_accum
        self.optimizer.zero_grad(set_to_none=True)
        losses, parts = [], []
        for m, rows in enumerate(self.micro_rows):
            t_cpu, noise = self._micro_batch_noise(t_global, key, rows)
            loss, part = self._micro_step(x0[m * per_micro:(m + 1) * per_micro], t_cpu, noise,
                                          last=m == cfg.grad_accum - 1)
            losses.append(loss)
            parts.append(part)

        self.precision.unscale(self.optimizer)
        if cfg.grad_clip:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        else:
            grad_norm = torch.zeros((), device=self.device)
        lr = self.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        taken = self.precision.step(self.optimizer)
        if self.ema is not None:
            self.ema.update(self.model, self.step)
        self.step += 1
        if cfg.grad_accum == 1:
            self.stats.add(losses[0], parts[0], grad_norm, skipped=not taken)
        else:  # the step's means over its micro-batches
            mean = [torch.stack(values).mean() for values in zip(*parts, strict=True)]
            self.stats.add(torch.stack(losses).mean(), LossParts(*mean), grad_norm, skipped=not taken)

    # ----- samples -----------------------------------------------------------------------------------
    def _sample(self, bar=None) -> Path | None:
        """Write a sample grid of the EMA model (rank 0); with a progress bar, say so on it while sampling
        (a grid can take longer than many training steps) and print a line when it is written."""
        if self.sample_fn is None or not self.dist.is_main:
            return None
        started = time.perf_counter()
        if bar is not None:
            bar.set_description_str(f"train: sampling a grid at step {self.step}")
            bar.refresh()
        model = self.ema_model
        was_training = model.training
        model.eval()
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                samples = self.sample_fn(model, self.step)
        finally:
            model.train(was_training)
        path = self.out_dir / "samples" / f"step_{self.step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_samples(samples, path, title=f"{self.out_dir.name}, step {self.step}, λ = {self.config.iso_lambda:g}")
        if bar is not None:
            bar.set_description_str("train")
            bar.write(f"step {self.step}: sample grid {path} ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
        return path

    # ----- snapshots ---------------------------------------------------------------------------------
    def _trainer_state(self) -> dict:
        rng = ckpt_io.capture_rng({"noise": self.noise_generator}, self.device)
        per_rank = distributed.all_gather_objects(
            {"torch_cpu": rng.pop("torch_cpu"), "torch_cuda": rng.pop("torch_cuda", None)})
        scaler = self.precision.state_dict()
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            **({"scaler": scaler} if scaler is not None else {}),  # fp16 only: other checkpoints stay as they were
            "rng": rng,
            "rng_by_rank": [{k: v for k, v in r.items() if v is not None} for r in per_rank],
            "window": self.stats.state_dict(),
        }

    def save_checkpoint(self) -> Path | None:
        """Write checkpoint ``out_dir/checkpoints/step_XXXXXXX`` (rank 0; every rank must call it)."""
        state = self._trainer_state()  # a collective under DDP: every rank gathers
        path = None
        if self.dist.is_main:
            meta = {"config": self.config.to_dict(), "model_spec": self.model_spec,
                    "world_size": self.dist.world_size, "sample_shape": list(self.sample_shape)}
            path = ckpt_io.save_checkpoint(
                self.out_dir / "checkpoints", self.step, self.model.state_dict(),
                self.ema.state_dict() if self.ema is not None else None, state, meta, self.config.keep_checkpoints)
        self._last_saved = self.step
        distributed.barrier()
        return path

    def load_checkpoint(self, path: str | Path) -> int:
        """Restore model, EMA, optimizer, RNG streams and step from a checkpoint; returns the step."""
        return self._restore(ckpt_io.load_checkpoint(path))

    def _restore(self, ck: ckpt_io.Checkpoint) -> int:
        ckpt_io.load_state_dict_checked(self.model, ck.model, ck.path / "model.safetensors")
        if self.ema is not None:
            if ck.ema is None:
                warnings.warn(f"{ck.path} has no EMA weights; the EMA restarts from the model weights",
                              RuntimeWarning, stacklevel=2)
                self.ema.load_state_dict(self.model.state_dict())
            else:
                ckpt_io.load_state_dict_checked(self.ema.module, ck.ema, ck.path / "ema.safetensors")
        state = ck.state
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as exc:
            raise ckpt_io.CheckpointError(f"optimizer state in {ck.path / 'state.json'} does not fit this "
                                          f"optimizer: {exc}") from exc
        self.precision.load_state_dict(state.get("scaler"))
        by_rank = state["rng_by_rank"]
        rng = dict(state["rng"])
        if len(by_rank) == self.dist.world_size:
            rng.update(by_rank[self.dist.rank])
        elif self.dist.rank == 0:
            rng.update(by_rank[0])
        else:
            rng["torch_cpu"] = torch.Generator().manual_seed(
                global_seed(self.config.seed, self.dist.rank, ck.step)).get_state()
        ckpt_io.restore_rng(rng, {"noise": self.noise_generator}, self.device)
        if "torch_cuda" not in rng and self.device.type == "cuda":  # another world size: a fresh, seeded stream
            torch.cuda.manual_seed(global_seed(self.config.seed, self.dist.rank, ck.step))
        self.stats.load_state_dict(state.get("window", {}))
        self.step = ck.step
        self._last_saved = ck.step
        return ck.step

    # ----- the run -----------------------------------------------------------------------------------
    def _prepare_out_dir(self) -> None:
        """Create out_dir on rank 0; every rank raises if that failed (so no rank waits for a dead one)."""
        error = None
        if self.dist.is_main:
            try:
                check_writable_dir(self.out_dir)
            except OSError as exc:
                error = f"out_dir {str(self.out_dir)!r} is not writable: {exc}"
        error = distributed.all_gather_objects(error)[0]
        if error is not None:
            raise PermissionError(error)

    def _resume(self, resume: bool | str | Path, override: frozenset[str]) -> tuple[ckpt_io.Checkpoint | None, dict]:
        """Seed a fresh run, or restore the checkpoint ``resume`` names (see `fit`); returns (that checkpoint
        or None for a fresh run, the overridden settings {field: (old, new)})."""
        ckpt_root = self.out_dir / "checkpoints"
        if resume is False:
            if override:
                raise ValueError("override applies to a resume only (resume=True or a path; --resume)")
            if ckpt_io.list_checkpoints(ckpt_root) or (ckpt_root / ckpt_io.LATEST).exists():
                raise FileExistsError(f"{ckpt_root} already holds checkpoints: pass resume=True (--resume) to "
                                      "continue that run, or choose another out_dir")
            seed_global_rngs(self.config.seed, self.dist.rank)
            return None, {}
        source, note = resume_io.checkpoint_to_resume(ckpt_root, resume)
        if source is None:
            self._say(f"no checkpoint in {ckpt_root}; starting a fresh run")
            seed_global_rngs(self.config.seed, self.dist.rank)
            return None, {}
        if note:
            self._say(note)
        resume_io.check_destination(ckpt_root, source)
        ck = resume_io.with_recovery_hint(ckpt_io.load_checkpoint, source, self.out_dir)
        changes = resume_io.config_changes(ck.meta.get("config", {}), self.config.to_dict(), override, ck.path)
        self._restore(ck)
        return ck, changes

    def _say(self, message: str) -> None:
        if self.dist.is_main:
            print(f"isofast: {message}", file=sys.stderr)

    def _start_resumed(self, ck: ckpt_io.Checkpoint, changes: dict) -> None:
        """Rank 0, before the first step of a resumed run: set newer checkpoints aside, record overrides."""
        moved = resume_io.set_aside_newer(self.out_dir / "checkpoints", ck.path)
        if moved:
            self._say(f"resuming {ck.path.name}: the newer checkpoints {', '.join(p.name for p in moved)} are "
                      f"set aside in {moved[0].parent} (not deleted), so this run cannot overwrite them")
        resume_io.record_changes(self.out_dir, ck.step, changes, ck.path)

    def fit(self, resume: bool | str | Path = False, override: Iterable[str] = ()) -> Trainer:
        """Train until ``config.steps`` optimizer steps are done; returns self (``steps_trained``: how many now).

        resume: False starts fresh (refused if out_dir already holds checkpoints); True continues from
        ``out_dir``'s newest complete checkpoint (or starts fresh when there is none); a path continues from
        that checkpoint (a step directory, a checkpoints folder or a run folder). `isofast.resume` says what
        a resume checks and keeps: the run's settings must equal the checkpoint's, except the fields named
        in ``override`` (recorded in ``out_dir/history.jsonl``) and `isofast.resume.FREE_FIELDS`.
        """
        cfg = self.config
        override = resume_io.check_override(override)
        # --- set-up: the run folder
        self._prepare_out_dir()
        # --- resume: a checkpoint's weights, optimizer, RNG streams and unlogged window (or a fresh run's seeds)
        ck, changes = self._resume(resume, override)
        start, self.steps_trained = self.step, 0
        if ck is not None and start >= cfg.steps:
            self._say(f"{ck.path} is at step {start}, at or past steps={cfg.steps}: nothing trained (ask for "
                      "more steps to continue the run)")
            return self
        if self.dist.is_main:
            if ck is not None:
                self._start_resumed(ck, changes)
            atomic_write_text(self.out_dir / "config.json", json.dumps(cfg.to_dict(), indent=1) + "\n")
            if self.model_spec is not None:
                atomic_write_text(self.out_dir / "model.json", json.dumps(self.model_spec, indent=1) + "\n")
        self.stats.open(ck.step if ck is not None else -1, cfg.logger, cfg.to_dict())
        self.model.train()

        bar = None
        if cfg.progress and self.dist.is_main and sys.stderr.isatty():
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        try:
            # --- the loop: a step; every few steps the stats, a sample grid, a snapshot
            batches = step_batches(self._data, self._order, distributed.read_rows(self.micro_rows), self.step,
                                   self.device, cfg.num_workers, self.dist.rank)
            while self.step < cfg.steps:
                self.train_step(next(batches))
                if bar is not None:
                    bar.update(1)
                if self.step % cfg.log_every == 0:
                    row = self.stats.log(self.step, self.lr_at(self.step - 1))
                    if bar is not None and row is not None:
                        bar.set_postfix(loss=row["loss"], isotropy=row["isotropy"])  # train_stats' names
                if cfg.sample_every and self.step % cfg.sample_every == 0:
                    self._sample(bar)
                if self.step % cfg.ckpt_every == 0:
                    self.save_checkpoint()
            # --- the end: a last snapshot, the last stats, a last sample grid
            # (the snapshot holds the unlogged window, so a resumed run re-logs it in its next row)
            if self._last_saved != self.step:
                self.save_checkpoint()
            if self.stats.steps:
                self.stats.log(self.step, self.lr_at(self.step - 1))
            if cfg.sample_every and self.sample_fn is not None and self.step % cfg.sample_every != 0:
                self._sample(bar)
        finally:
            self.steps_trained = self.step - start
            if bar is not None:
                bar.close()
            self.stats.close()
        return self

    def close(self) -> None:
        """Destroy the process group if this trainer created it (call once, after the last fit)."""
        distributed.shutdown(self.dist)
