"""torchrun / DDP helpers: process-group set-up from the environment, rank facts, collectives, sharding.

One process (plain ``python``) and many (``torchrun --nproc_per_node N``) run the same code: every
helper degrades to the obvious single-process answer when no process group is initialised.

Sharding scheme (what makes N processes train exactly like one):

* Every rank holds the *same* seeded generators, so every rank draws the same global batch of
  indices, the same global timesteps ``t`` (B,) and the same global `NoiseKey` for the (B, ...)
  noise; rank r keeps rows ``[r*B/W, (r+1)*B/W)`` of each (`rank_rows`).
* The noise of those rows is, by the contract, elements ``r*(B/W)*n ...`` of the global draw
  (n elements per sample). When ``r*(B/W)*n`` is a multiple of 4 it starts on a Philox counter
  boundary and is itself a draw: ``NoiseKey(seed, offset + r*(B/W)*n/4)`` (`rank_noise`), so the
  fused ops still regenerate it in-kernel. Otherwise the rank materialises exactly its own
  elements (reading only its share, never the whole global draw) and passes them as a tensor.
  Either way each rank's noise differs from the others' and the union is the 1-process noise.
* DDP averages gradients over ranks, which is exact for every per-sample mean in the loss. The
  batch isotropy penalty ``(S - 1)^2``, with S the mean of s_b over the *global* batch, is not: each
  rank all-reduces its own mean S_r to S and adds ``lambda [(S - 1)^2 + 2 (S - 1) (S_r - stopgrad(S_r))]``
  (`global_batch_iso_loss`). Its value is the global penalty and its rank-averaged gradient is
  exactly d/dtheta lambda (S - 1)^2, so W processes give the weights of one process on the same
  global batch (up to float summation order).
* Gradient accumulation (``grad_accum`` N): an optimizer step's global batch is N micro-batches of B
  rows, micro-batch m its rows ``[m B, (m+1) B)``, each sharded over ranks as above
  (`micro_batch_rows`). So W processes with N micro-batches take the same step as one process with N,
  batch penalty included; every rank skips DDP's gradient all-reduce on all but the last micro-batch
  (``no_sync``), whose all-reduce then averages the sums of all N.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .noise import MASK64, NoiseKey, randn_contract
from .ops import iso_ddpm_loss
from .reference import LossParts

__all__ = [
    "DistInfo",
    "all_gather_objects",
    "all_reduce_mean",
    "barrier",
    "env_world",
    "global_batch_iso_loss",
    "init_from_env",
    "is_main_process",
    "micro_batch_rows",
    "read_rows",
    "pick_device",
    "rank_noise",
    "rank_rows",
    "shutdown",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size``, ``local_rank`` on its node, its device.

    ``backend`` is the torch.distributed backend ("nccl"/"gloo") or None for one process;
    ``owns_group`` says whether `init_from_env` created the process group (so `shutdown` ends it).
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes logs, sample grids and checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from the variables torchrun sets (0, 0, 1 when absent)."""
    def read(name: str, default: int) -> int:
        value = os.environ.get(name, "")
        try:
            return int(value) if value != "" else default
        except ValueError:
            raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None

    world = read("WORLD_SIZE", 1)
    rank = read("RANK", 0)
    local_rank = read("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    return rank, local_rank, world


def pick_device(device: str | torch.device = "auto", local_rank: int = 0) -> torch.device:
    """The training device: "auto" is cuda:<local_rank> when CUDA is available, else CPU.

    An explicit "cuda" (without an index) also becomes cuda:<local_rank>, so one command line
    serves every rank.
    """
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise TypeError(f"device must be a str or torch.device, got {type(device).__name__}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} requested but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
    return dev


def init_from_env(device: str | torch.device = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Initialise torch.distributed when launched by torchrun (WORLD_SIZE > 1), else describe one process.

    Backend: nccl when the device is CUDA, gloo on CPU. The CUDA device of the rank is made current.
    A process group that already exists (created by the caller) is reused and left alone.
    """
    rank, local_rank, world = env_world()
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world == 1 and not dist.is_initialized():
        return DistInfo(0, local_rank, 1, dev, None, False)
    owns = False
    if not dist.is_initialized():
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
        owns = True
    return DistInfo(dist.get_rank(), local_rank, dist.get_world_size(), dev, dist.get_backend(), owns)


def shutdown(info: DistInfo) -> None:
    """Destroy the process group if `init_from_env` created it."""
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of ``x`` over ranks (a new tensor; ``x`` itself is returned in one process)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return x
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y / dist.get_world_size()


def all_gather_objects(obj: object) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank ([obj] in one process)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def rank_rows(global_batch: int, rank: int, world_size: int) -> slice:
    """Rows of the global batch that ``rank`` trains on: ``[rank*b, (rank+1)*b)``, b = global_batch / world_size."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    if global_batch % world_size:
        raise ValueError(f"batch_size={global_batch} (the global batch) must be divisible by the world size {world_size}")
    per_rank = global_batch // world_size
    return slice(rank * per_rank, (rank + 1) * per_rank)


def micro_batch_rows(batch_size: int, grad_accum: int, rank: int, world_size: int) -> list[slice]:
    """This rank's rows of each of the ``grad_accum`` micro-batches of one optimizer step, as rows of the step's
    global batch of ``batch_size * grad_accum``: micro-batch m's are ``m * batch_size + rank_rows(batch_size, ...)``."""
    if isinstance(grad_accum, bool) or not isinstance(grad_accum, int) or grad_accum < 1:
        raise ValueError(f"grad_accum must be an int >= 1, got {grad_accum!r}")
    mine = rank_rows(batch_size, rank, world_size)
    return [slice(m * batch_size + mine.start, m * batch_size + mine.stop) for m in range(grad_accum)]


def read_rows(micro_rows: list[slice]) -> slice | torch.Tensor:
    """The rows of the step's global batch this rank reads, micro-batch after micro-batch: one slice when
    they are contiguous (one process, or no accumulation), else an int64 index tensor."""
    if all(a.stop == b.start for a, b in zip(micro_rows[:-1], micro_rows[1:], strict=True)):
        return slice(micro_rows[0].start, micro_rows[-1].stop)
    return torch.cat([torch.arange(r.start, r.stop) for r in micro_rows])


def rank_noise(key: NoiseKey, rows: slice) -> NoiseKey | torch.Tensor:
    """The noise of ``rows`` of the global draw ``key`` (shape (B, ...)): exactly those elements of the contract.

    Returns a `NoiseKey` (shape (rows, ...)) when the first element sits on a Philox counter boundary
    (``rows.start * n % 4 == 0``), else the float tensor of those elements, generated by the reference
    contract from the counter that holds the first one (only this rank's share is computed).
    """
    sample_shape = key.shape[1:]
    n = 1
    for s in sample_shape:
        n *= s
    start, stop = rows.start or 0, rows.stop
    if not 0 <= start < stop <= key.shape[0]:
        raise ValueError(f"rows {start}:{stop} are outside the global batch of {key.shape[0]}")
    first = start * n
    shape = (stop - start, *sample_shape)
    if first % 4 == 0:
        return NoiseKey(key.seed, (key.offset + first // 4) & MASK64, shape, key.dtype, key.device)
    skip = first % 4
    numel = (stop - start) * n
    values = randn_contract(key.seed, (key.offset + first // 4) & MASK64, numel + skip, key.device)[skip:]
    return values.reshape(shape).to(key.dtype)


def global_batch_iso_loss(eps_pred: torch.Tensor, noise: NoiseKey | torch.Tensor, iso_lambda: float,
                          backend: str | None = None) -> tuple[torch.Tensor, LossParts]:
    """The Iso-Diffusion loss with the batch penalty of the *global* batch, on one rank's share of it.

    eps_pred (B/W, ...) and its noise (a key or the tensor, as from `rank_noise`). With S_r = mean(eps_pred^2)
    on this rank and S its mean over ranks::

        loss = mse_r + lambda [(S - 1)^2 + 2 (S - 1) (S_r - stopgrad(S_r))]

    Returns (loss, LossParts(mse_r, (S - 1)^2, S)). A collective: every rank must call it. In one process
    S = S_r, and this is ``iso_ddpm_loss(eps_pred, noise, iso_lambda, "batch")``.
    """
    mse, parts = iso_ddpm_loss(eps_pred, noise, 0.0, "batch", return_parts=True, backend=backend)
    s_local = eps_pred.float().square().mean()
    s_global = all_reduce_mean(s_local.detach())
    iso = (s_global - 1.0) ** 2
    loss = mse + iso_lambda * (iso + 2.0 * (s_global - 1.0) * (s_local - s_local.detach()))
    return loss, LossParts(parts.mse, iso, s_global)
