"""The data order of a training run, and the seeds of its other random streams.

Epoch e visits a dataset of N samples in the order ``epoch_permutation(N, seed, e)`` (a generator seeded
from (seed, e) alone), B at a time, the incomplete tail dropped. So the global batch of step s is a pure
function of (seed, s)::

    epoch, pos = divmod(s, N // B);   indices(s) = epoch_permutation(N, seed, epoch)[pos B : (pos + 1) B]

and needs no saved state: a run resumes mid-epoch, with any world size, at no cost. Under W processes
rank r keeps rows ``[r B/W, (r+1) B/W)`` of every global batch (`isofast.distributed.rank_rows`), so
the shards of one step together are exactly the 1-process batch.

Every seed of a run is mixed from (seed, a domain tag, ...) by numpy's SeedSequence, so the data order,
the timesteps and noise (`make_noise_generator`) and torch's/numpy's global generators (`global_seed`,
`seed_global_rngs`) are independent streams, identical on every platform.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..train_config import TIMESTEP_MODES

__all__ = [
    "TIMESTEP_MODES",
    "EpochOrder",
    "StepBatchSampler",
    "draw_timesteps",
    "epoch_permutation",
    "first_item",
    "global_seed",
    "make_noise_generator",
    "mix_seed",
    "seed_global_rngs",
    "step_batches",
]

_NOISE_STREAM = 0x150F  # domain tags keep the data, noise and global streams independent
_DATA_STREAM = 0xDA7A
_GLOBAL_STREAM = 0x610B


def mix_seed(*words: int) -> int:
    """A 63-bit seed mixed from integers (numpy's SeedSequence: well spread, platform independent)."""
    return int(np.random.SeedSequence([int(w) & 0xFFFFFFFFFFFFFFFF for w in words]).generate_state(1, np.uint64)[0] >> 1)


def make_noise_generator(seed: int) -> torch.Generator:
    """The CPU generator of timesteps and noise keys of a run with ``seed`` (identical on every rank)."""
    return torch.Generator(device="cpu").manual_seed(mix_seed(seed, _NOISE_STREAM))


def draw_timesteps(T: int, batch_size: int, mode: str, generator: torch.Generator) -> torch.Tensor:
    """int64 (batch_size,) training timesteps from ``generator``: "per-sample", each row its own draw of
    U{0..T-1} (DDPM); "per-batch", one draw shared by the whole batch (what the Iso-Diffusion authors'
    2024 training loop did in effect; it gives the batch isotropy penalty a single noise level)."""
    if mode == "per-sample":
        return torch.randint(0, T, (batch_size,), generator=generator)
    if mode == "per-batch":
        return torch.randint(0, T, (1,), generator=generator).repeat(batch_size)
    raise ValueError(f"timesteps must be one of {TIMESTEP_MODES}, got {mode!r}")


def global_seed(seed: int, rank: int, *step: int) -> int:
    """The seed of torch's and numpy's global generators on ``rank``: of a fresh run (no ``step``), or of a
    run resumed at ``step`` with another world size (whose saved global states do not fit every rank)."""
    return mix_seed(seed, _GLOBAL_STREAM, rank, *step)


def seed_global_rngs(seed: int, rank: int) -> None:
    """Seed torch's global generators (CPU and every GPU) and numpy's on ``rank`` of a fresh run."""
    torch.manual_seed(global_seed(seed, rank))
    np.random.seed(global_seed(seed, rank) % 2**32)


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """int64 (n,): the order in which epoch ``epoch`` visits a dataset of n samples."""
    g = torch.Generator(device="cpu").manual_seed(mix_seed(seed, _DATA_STREAM, epoch))
    return torch.randperm(n, generator=g)


class EpochOrder:
    """Global batch indices of step s: B consecutive entries of the epoch's permutation (tail dropped)."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        if n < batch_size:
            raise ValueError(f"batch_size={batch_size} exceeds the dataset size {n}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.per_epoch = n // batch_size
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.int64)

    def indices(self, step: int) -> torch.Tensor:
        """int64 (B,): the dataset indices of step ``step``'s global batch."""
        epoch, pos = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, epoch_permutation(self.n, self.seed, epoch)
        return self._perm[pos * self.batch_size:(pos + 1) * self.batch_size]


class StepBatchSampler(Sampler[list[int]]):
    """Yields, for steps ``start_step, start_step + 1, ...`` (forever), this rank's rows of the global batch.

    The distributed sampler of the trainer: like ``DistributedSampler`` it shards every batch over ranks,
    but the shards of one step together are exactly the 1-process batch, and it can start mid-epoch.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rows: slice | torch.Tensor, start_step: int = 0) -> None:
        self.order = EpochOrder(n, batch_size, seed)
        self.rows = rows
        self.start_step = start_step

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            yield self.order.indices(step)[self.rows].tolist()
            step += 1


def first_item(batch: object) -> torch.Tensor:
    """Datasets may yield x or (x, label, ...); the trainer uses x."""
    if isinstance(batch, (list, tuple)):
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise TypeError(f"the dataset must yield tensors (or tuples whose first item is one), got {type(batch).__name__}")
    return batch


def step_batches(data: torch.Tensor | Dataset, order: EpochOrder, rows: slice | torch.Tensor, start_step: int,
                 device: torch.device, num_workers: int = 0, rank: int = 0) -> Iterator[torch.Tensor]:
    """This rank's x0, rows ``rows`` (a slice or an int64 index) of the global batch as float32 on ``device``, for
    steps start_step, ... (with gradient accumulation the global batch is the optimizer step's, and ``rows`` this
    rank's rows of each micro-batch in turn: `isofast.distributed.read_rows`).

    ``data``: a tensor (N, ...) already on ``device`` (batched in-process by index), or a Dataset read by a
    DataLoader over a `StepBatchSampler`. Its workers are seeded per (seed, rank, start_step), so a resumed
    run's random augmentation differs from an uninterrupted run's (tensors and ``num_workers=0`` are exact).
    """
    if isinstance(data, torch.Tensor):
        step = start_step
        while True:
            idx = order.indices(step)[rows].to(device, non_blocking=True)
            yield data.index_select(0, idx)
            step += 1
    sampler = StepBatchSampler(order.n, order.batch_size, order.seed, rows, start_step)
    loader_gen = torch.Generator().manual_seed(mix_seed(order.seed, rank, start_step))
    loader = DataLoader(data, batch_sampler=sampler, num_workers=num_workers, pin_memory=device.type == "cuda",
                        generator=loader_gen, persistent_workers=False)
    for batch in loader:
        yield first_item(batch).to(device, torch.float32, non_blocking=True)
