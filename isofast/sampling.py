"""Sampling loops: DDPM ancestral and DDIM, eager or captured as a CUDA graph.

Each sampler is one plain function over a model and a `NoiseSchedule` (k-diffusion style):
``model(x_t, t) -> eps_pred`` with x_t of ``shape`` (B, ...) and t an int64 (B,) tensor.

The noise of a run, and so the samples, are fixed by torch's random state (the default CPU
generator, or ``generator``). Per chunk of the batch (see ``batch_size``), two keys are drawn
with `NoiseKey.draw`, in this order:

* ``x_T = NoiseKey.draw(shape).materialize()``, the starting noise;
* a second key whose seed keys every step's fresh noise: step ``i`` (``i = 0`` is the first
  step, at the largest t) uses ``NoiseKey(seed, offset=i * calls_for(numel), shape)``, so the
  steps read consecutive, disjoint stretches of one Philox stream (`step_key`).

Every loop keeps its state on the device (`StepLoop`): x, the timesteps, the step counter and
the keys, ``key_i = [seed, 0] + [0, i * calls_for(numel)]`` (`step_key`'s, computed on the device),
and one step is ``x <- update(x, model(x, t_i), t_i, t_prev_i, key_i)``, the fused step op. On CUDA
that step is captured once as a CUDA graph (`isofast.cuda_graph.capture`) and replayed once per
step: the host only resets the buffers between chunks, no host sync per step. Elsewhere the same
step runs eagerly, so both paths give the same samples.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import TypedDict

import torch
from tqdm.auto import tqdm
from typing_extensions import Unpack  # typing.Unpack is Python >= 3.11

from . import cuda_graph, scalars
from .diffusers_bridge.models import check_timesteps
from .noise import NoiseKey, calls_for, check_generator, to_signed
from .ops import backends
from .ops.steps import ddim_step_keyed, ddpm_step_keyed
from .schedule import NoiseSchedule

__all__ = ["ddpm_sample", "ddim_sample", "ddpm_timesteps", "ddim_timesteps", "step_key", "SampleOptions", "StepLoop"]

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# update(x, eps_pred, t, t_prev, key, backend) -> x_prev: one step op, graph-safe (device tensors only)
Update = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, str], torch.Tensor]
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# ----- timesteps and keys ------------------------------------------------------------------------------
def ddpm_timesteps(T: int) -> tuple[list[int], list[int]]:
    """(t, t_prev) of the DDPM loop: t = T-1, ..., 0 and t_prev = t - 1 (-1 at the last step)."""
    t = list(range(T - 1, -1, -1))
    return t, [s - 1 for s in t]


def ddim_timesteps(T: int, steps: int) -> tuple[list[int], list[int]]:
    """(t, t_prev) of a DDIM loop of ``steps`` jumps, "leading" spacing as diffusers' `DDIMScheduler`.

    With r = T // steps: t = (steps-1) r, ..., r, 0 and t_prev = t - r, except -1 at the end
    (ab_prev = 1, i.e. diffusers' ``set_alpha_to_one=True``). steps == T gives t = T-1, ..., 0.
    """
    if not scalars.is_integer(steps) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an int in [1, T={T}], got {steps!r}")
    steps = int(steps)
    ratio = T // steps
    t = [i * ratio for i in range(steps - 1, -1, -1)]
    return t, [s - ratio for s in t[:-1]] + [-1]


def step_key(seed: int, i: int, shape: Sequence[int], dtype: torch.dtype = torch.float32,
             device: torch.device | str = "cpu") -> NoiseKey:
    """The key of step ``i``'s fresh noise: ``NoiseKey(seed, i * calls_for(numel), shape)``."""
    key = NoiseKey(seed=seed, offset=0, shape=tuple(shape), dtype=dtype, device=device)
    return NoiseKey(seed=seed, offset=i * calls_for(key.numel), shape=key.shape, dtype=dtype, device=device)


class SampleOptions(TypedDict, total=False):
    """How a sampler runs, the same for every sampler (keyword arguments).

    generator: torch generator the keys are drawn from (default: torch's global one).
    device: where to sample (default: the device of the model's first parameter, else CPU).
    dtype: dtype of x (float32 default; float64, float16, bfloat16).
    cuda_graph: capture one step as a CUDA graph and replay it (None: on CUDA with a fused
        backend). Ignored on CPU; True with the reference backend raises ValueError.
    progress: tqdm bar over the steps (None: only when stderr is a terminal).
    backend: backend of the step op (see `isofast.ops.backends`).
    batch_size: sample in chunks of at most this many samples, each with its own keys
        (so samples depend on it); None: one chunk.
    """

    generator: torch.Generator | None
    device: torch.device | str | None
    dtype: torch.dtype
    cuda_graph: bool | None
    progress: bool | None
    backend: str | None
    batch_size: int | None


# ----- the samplers -------------------------------------------------------------------------------------
def ddpm_sample(
    model: Model,
    shape: Sequence[int],
    sched: NoiseSchedule,
    *,
    clip_x0: bool = False,
    variance: str = "fixed_small",
    **options: Unpack[SampleOptions],
) -> torch.Tensor:
    """Ancestral DDPM sampling (Ho et al., 2020): T steps x_T ~ N(0, I) -> x_0.

    Each step is `isofast.ddpm_step`: x_{t-1} = coef1_t x0_hat + coef2_t x_t + [t > 0] sigma_t z,
    x0_hat = (x_t - sqrt(1 - ab_t) eps_pred) / sqrt(ab_t) (clipped to [-1, 1] if ``clip_x0``);
    sigma_t^2 = posterior variance ("fixed_small") or beta_t ("fixed_large").

    Args:
        model: ``model(x_t, t) -> eps_pred`` of x_t's shape; t is int64 (B,) on ``device``.
        shape: (B, ...) of the samples.
        sched: the schedule the model was trained with.
        clip_x0, variance: as above.
        options: `SampleOptions` (generator, device, dtype, cuda_graph, progress, backend, batch_size).

    Returns:
        (B, ...) tensor of ``dtype`` on ``device``: the samples x_0.
    """
    sched = _check_sched(sched, model)
    if variance not in ("fixed_small", "fixed_large"):
        raise ValueError(f"variance must be one of ('fixed_small', 'fixed_large'), got {variance!r}")

    def update(x, eps, t, t_prev, key, name):
        return ddpm_step_keyed(x, eps, t, sched, None, key, bool(clip_x0), variance, name)

    return _Loop.plan(model, shape, **options).sample(model, update, *ddpm_timesteps(sched.T), "ddpm sampling")


def ddim_sample(
    model: Model,
    shape: Sequence[int],
    sched: NoiseSchedule,
    steps: int = 50,
    eta: float = 0.0,
    *,
    clip_x0: bool = False,
    **options: Unpack[SampleOptions],
) -> torch.Tensor:
    """DDIM sampling (Song et al., 2021) over ``steps`` timesteps of `ddim_timesteps` (leading spacing).

    Each jump t -> t_prev is `isofast.ddim_step`:
    x_prev = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev - sigma^2) eps_pred + sigma z, with
    sigma = eta sqrt((1 - ab_prev)/(1 - ab_t) (1 - ab_t/ab_prev)); eta = 0 is deterministic given
    x_T, eta = 1 with steps == T is the DDPM ancestral sampler with "fixed_small" variance.
    The last jump goes to t_prev = -1 (ab_prev = 1). Other arguments as in `ddpm_sample`.

    A diffusers model: ``ddim_sample(lambda x, t: unet(x, t).sample, shape, NoiseSchedule.from_diffusers(
    pipe.scheduler), steps, eta)`` gives diffusers' `DDIMScheduler` loop from the same x_T (test:
    tests/test_diffusers_sampling.py) when that scheduler has its defaults ``timestep_spacing="leading"``,
    ``steps_offset=0``, ``set_alpha_to_one=True``, and ``clip_sample`` equal to ``clip_x0`` (x0 is clipped
    to [-1, 1]; eps_pred is not recomputed, as ``use_clipped_model_output=False``). A plain function runs on
    ``device`` (default CPU: pass the unet's device); `isofast.diffusers_bridge.models.DiffusersUNet2D`
    (``DiffusersUNet2D(unet=unet)``) is the same call as an `nn.Module`, whose device the sampler finds, and
    whose config's ``num_train_timesteps``, when set, must equal ``sched.T`` (ValueError otherwise; a plain
    function declares no T, so nothing is checked).
    """
    if not scalars.is_real(eta) or not 0.0 <= eta < float("inf"):
        raise ValueError(f"eta must be a finite float >= 0, got {eta!r}")
    sched, eta = _check_sched(sched, model), float(eta)
    t_seq, t_prev_seq = ddim_timesteps(sched.T, steps)

    def update(x, eps, t, t_prev, key, name):
        return ddim_step_keyed(x, eps, t, t_prev, sched, eta, None, key, bool(clip_x0), name)

    return _Loop.plan(model, shape, **options).sample(model, update, t_seq, t_prev_seq, "ddim sampling")


# ----- the shared driver: chunks, keys, graph or eager --------------------------------------------------
def _check_sched(sched: object, model: object) -> NoiseSchedule:
    if not isinstance(sched, NoiseSchedule):
        raise TypeError(f"sched must be a NoiseSchedule, got {type(sched).__name__}")
    # a diffusers model declares the T it was trained for; a plain function declares nothing
    check_timesteps(model, sched.T, "sched.T")
    return sched


class _Loop:
    """How a sampler runs, decided once from its arguments: device, dtype, backend, graph, chunks."""

    def __init__(self, shape, generator, device, dtype, backend, use_graph, chunk, progress) -> None:
        self.shape, self.generator, self.device, self.dtype = shape, generator, device, dtype
        self.backend, self.use_graph, self.chunk, self.progress = backend, use_graph, chunk, progress

    @classmethod
    def plan(cls, model, shape, *, generator=None, device=None, dtype=torch.float32, cuda_graph=None, progress=None,
             backend=None, batch_size=None) -> _Loop:
        shape = _check_shape(shape)
        if not callable(model):
            raise TypeError(f"model must be callable as model(x_t, t), got {type(model).__name__}")
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be a floating dtype {FLOAT_DTYPES}, got {dtype}")
        if batch_size is not None and (not scalars.is_integer(batch_size) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
        batch_size = None if batch_size is None else int(batch_size)
        check_generator(generator)
        try:
            device = torch.device(device) if device is not None else _model_device(model)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device must be a torch.device or a device string, got {device!r}") from exc
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        name = backends.resolve(backend, device, dtype)
        chunk = shape[0] if batch_size is None else min(batch_size, shape[0])
        progress = sys.stderr.isatty() if progress is None else progress
        return cls(shape, generator, device, dtype, name, _use_graph(cuda_graph, device, name), chunk, progress)

    def sample(self, model: Model, update: Update, t_seq: list[int], t_prev_seq: list[int], desc: str) -> torch.Tensor:
        """All chunks: per chunk, x_T and the step seed drawn in that order, then the step loop."""
        shape, chunk = self.shape, self.chunk
        out = torch.empty(shape, dtype=self.dtype, device=self.device) if chunk < shape[0] else None
        loops: dict[int, StepLoop] = {}  # one loop (and graph) per chunk size, reused with new keys
        bar = tqdm(total=len(t_seq) * -(-shape[0] // chunk), desc=desc, disable=not self.progress, leave=False,
                   unit="step")
        with torch.no_grad():
            for start in range(0, shape[0], chunk):
                cshape = (min(chunk, shape[0] - start), *shape[1:])
                x_T = NoiseKey.draw(cshape, self.dtype, self.device, self.generator).materialize()
                noise_seed = NoiseKey.draw(cshape, self.dtype, self.device, self.generator).seed
                loop = loops.get(cshape[0])
                if loop is None:
                    loop = loops[cshape[0]] = StepLoop(model, update, x_T, t_seq, t_prev_seq, self.backend)
                    if self.use_graph:
                        loop.capture()
                x = loop.run(x_T, noise_seed, bar)
                if out is None:
                    out = x  # one chunk: no copy
                else:
                    out[start:start + cshape[0]] = x
        bar.close()
        return out


def _check_shape(shape: object) -> tuple[int, ...]:
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    if not isinstance(shape, (tuple, list)) or not shape or not all(scalars.is_integer(s) and s >= 1 for s in shape):
        raise ValueError(f"shape must be a non-empty sequence of positive ints (B, ...), got {shape!r}")
    return tuple(int(s) for s in shape)


def _model_device(model: object) -> torch.device:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


def _use_graph(cuda_graph: bool | None, device: torch.device, backend: str) -> bool:
    if device.type != "cuda":
        return False  # CUDA graphs exist only on CUDA; CPU always runs eagerly
    fused = backend != "reference"
    if cuda_graph is None:
        return fused
    if cuda_graph and not fused:
        raise ValueError("cuda_graph=True needs a fused backend (the reference step draws its noise on the host)")
    return bool(cuda_graph)


class StepLoop:
    """One sampling loop's device-resident state, and its step as a graph-safe function.

    Static tensors on the device: ``x`` (the current sample), ``t_seq``/``t_prev_seq`` int64 (S,),
    ``key_base`` int64 (2,) = [seed, 0] and ``key_steps`` int64 (S, 2) = [0, i * calls_for(numel)]
    (bit patterns, see `isofast.noise.to_signed`), ``index`` int64 (1,) the step counter.
    `step` reads only these, so it can be captured once and replayed with new contents.
    """

    def __init__(self, model: Model, update: Update, x: torch.Tensor, t_seq: list[int], t_prev_seq: list[int],
                 backend: str) -> None:
        device = x.device
        self.model, self.update, self.backend = model, update, backend
        self.num_steps = len(t_seq)
        self.x = x.clone()
        self.t_seq = torch.tensor(t_seq, dtype=torch.int64, device=device)
        self.t_prev_seq = torch.tensor(t_prev_seq, dtype=torch.int64, device=device)
        calls = calls_for(x.numel())
        offsets = [[0, to_signed(i * calls)] for i in range(self.num_steps)]
        self.key_steps = torch.tensor(offsets, dtype=torch.int64, device=device).reshape(self.num_steps, 2)
        self.key_base = torch.zeros(2, dtype=torch.int64, device=device)
        self.index = torch.zeros(1, dtype=torch.int64, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None

    def current_key(self) -> torch.Tensor:
        """int64 (2,) key of the current step: key_base + key_steps[index] (no host sync)."""
        return self.key_base + self.key_steps.index_select(0, self.index).reshape(2)

    def step(self) -> None:
        """One step x <- update(x, model(x, t_i), t_i, t_prev_i, key_i); index += 1. No host reads."""
        batch = self.x.shape[0]
        t = self.t_seq.index_select(0, self.index).expand(batch).contiguous()
        t_prev = self.t_prev_seq.index_select(0, self.index).expand(batch).contiguous()
        eps = self.model(self.x, t)
        if not isinstance(eps, torch.Tensor):
            raise TypeError(f"model output eps_pred must be a torch.Tensor, got {type(eps).__name__}")
        eps = eps.to(self.x.dtype)
        if eps.shape != self.x.shape:  # shapes are host metadata: checking them is graph-safe
            raise ValueError(f"model output eps_pred must have the shape of x_t {tuple(self.x.shape)}, "
                             f"got {tuple(eps.shape)}")
        self.x.copy_(self.update(self.x, eps, t, t_prev, self.current_key(), self.backend))
        self.index.add_(1)

    def reset(self, x_T: torch.Tensor, noise_seed: int) -> None:
        """Load a new starting point and noise seed into the static tensors."""
        self.x.copy_(x_T)
        self.key_base.copy_(torch.tensor([to_signed(noise_seed), 0], dtype=torch.int64), non_blocking=False)
        self.index.zero_()

    def capture(self) -> None:
        """Capture `step` as a CUDA graph (the buffers are reset before every run)."""
        x_T = self.x.clone()
        self.graph = cuda_graph.capture(self.step, self.x.device)
        self.reset(x_T, 0)

    def run(self, x_T: torch.Tensor, noise_seed: int, bar) -> torch.Tensor:
        """The whole loop from x_T with step noise keyed by ``noise_seed``; returns a copy of x_0."""
        self.reset(x_T, noise_seed)
        for _ in range(self.num_steps):
            if self.graph is not None:
                self.graph.replay()
            else:
                self.step()
            bar.update(1)
        return self.x.clone()
