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

The eager path passes those keys to the public `isofast.ddpm_step` / `isofast.ddim_step`
(fused kernels where available). The CUDA-graph path computes the very same keys on the
device, ``key_i = [seed, 0] + [0, i * calls_for(numel)]``, so both paths give the same samples.

CUDA graph: one step is captured (model forward, fused step, copy back into the static x
buffer, ``i += 1`` on a device counter) and replayed once per step. Everything a step reads
(x, the timestep table, the base key, the step counter) lives in static device tensors, so
the host only resets them between chunks and calls ``replay()``; there is no host sync per step.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from . import ops
from .noise import NoiseKey, calls_for, to_signed
from .ops import backends, dispatch, validation
from .ops.steps import ddim_step_keyed, ddpm_step_keyed
from .schedule import NoiseSchedule

__all__ = ["ddpm_sample", "ddim_sample", "ddpm_timesteps", "ddim_timesteps", "step_key"]

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_WARMUP_STEPS = 3  # side-stream warm-up before capture: Triton compilation, cuBLAS workspaces, allocator


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
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an int in [1, T={T}], got {steps!r}")
    ratio = T // steps
    t = [i * ratio for i in range(steps - 1, -1, -1)]
    return t, [s - ratio for s in t[:-1]] + [-1]


def step_key(seed: int, i: int, shape: Sequence[int], dtype: torch.dtype = torch.float32,
             device: torch.device | str = "cpu") -> NoiseKey:
    """The key of step ``i``'s fresh noise: ``NoiseKey(seed, i * calls_for(numel), shape)``."""
    key = NoiseKey(seed=seed, offset=0, shape=tuple(shape), dtype=dtype, device=device)
    return NoiseKey(seed=seed, offset=i * calls_for(key.numel), shape=key.shape, dtype=dtype, device=device)


# ----- the samplers -------------------------------------------------------------------------------------
def ddpm_sample(
    model: Model,
    shape: Sequence[int],
    sched: NoiseSchedule,
    *,
    clip_x0: bool = False,
    variance: str = "fixed_small",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    cuda_graph: bool | None = None,
    progress: bool | None = None,
    backend: str | None = None,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Ancestral DDPM sampling (Ho et al., 2020): T steps x_T ~ N(0, I) -> x_0.

    Each step is `isofast.ddpm_step`: x_{t-1} = coef1_t x0_hat + coef2_t x_t + [t > 0] sigma_t z,
    x0_hat = (x_t - sqrt(1 - ab_t) eps_pred) / sqrt(ab_t) (clipped to [-1, 1] if ``clip_x0``);
    sigma_t^2 = posterior variance ("fixed_small") or beta_t ("fixed_large").

    Args:
        model: ``model(x_t, t) -> eps_pred`` of x_t's shape; t is int64 (B,) on ``device``.
        shape: (B, ...) of the samples.
        sched: the schedule the model was trained with.
        generator: torch generator the keys are drawn from (default: torch's global one).
        device: where to sample (default: the device of the model's first parameter, else CPU).
        dtype: dtype of x (float32, float64, float16, bfloat16).
        cuda_graph: capture one step as a CUDA graph and replay it (None: on CUDA with a fused
            backend). Ignored on CPU; True with the reference backend raises ValueError.
        progress: tqdm bar over the steps (None: only when stderr is a terminal).
        backend: backend of the step op (see `isofast.ops.backends`).
        batch_size: sample in chunks of at most this many samples, each with its own keys
            (so samples depend on it); None: one chunk.

    Returns:
        (B, ...) tensor of ``dtype`` on ``device``: the samples x_0.
    """
    validation.choice("variance", variance, ("fixed_small", "fixed_large"))
    t_seq, t_prev_seq = ddpm_timesteps(_check_sched(sched).T)
    return _sample("ddpm", model, shape, sched, t_seq, t_prev_seq, 0.0, clip_x0, variance, generator,
                   device, dtype, cuda_graph, progress, backend, batch_size)


def ddim_sample(
    model: Model,
    shape: Sequence[int],
    sched: NoiseSchedule,
    steps: int = 50,
    eta: float = 0.0,
    *,
    clip_x0: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    cuda_graph: bool | None = None,
    progress: bool | None = None,
    backend: str | None = None,
    batch_size: int | None = None,
) -> torch.Tensor:
    """DDIM sampling (Song et al., 2021) over ``steps`` timesteps of `ddim_timesteps` (leading spacing).

    Each jump t -> t_prev is `isofast.ddim_step`:
    x_prev = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev - sigma^2) eps_pred + sigma z, with
    sigma = eta sqrt((1 - ab_prev)/(1 - ab_t) (1 - ab_t/ab_prev)); eta = 0 is deterministic given
    x_T, eta = 1 with steps == T is the DDPM ancestral sampler with "fixed_small" variance.
    The last jump goes to t_prev = -1 (ab_prev = 1). Other arguments as in `ddpm_sample`.
    """
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta < float("inf"):
        raise ValueError(f"eta must be a finite float >= 0, got {eta!r}")
    t_seq, t_prev_seq = ddim_timesteps(_check_sched(sched).T, steps)
    return _sample("ddim", model, shape, sched, t_seq, t_prev_seq, float(eta), clip_x0, "fixed_small",
                   generator, device, dtype, cuda_graph, progress, backend, batch_size)


# ----- shared driver ------------------------------------------------------------------------------------
def _check_sched(sched: object) -> NoiseSchedule:
    validation.schedule(sched)
    return sched  # type: ignore[return-value]


def _check_shape(shape: object) -> tuple[int, ...]:
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    if not isinstance(shape, (tuple, list)) or not shape or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape
    ):
        raise ValueError(f"shape must be a non-empty sequence of positive ints (B, ...), got {shape!r}")
    return tuple(shape)


def _model_device(model: object) -> torch.device:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


def _sample(kind, model, shape, sched, t_seq, t_prev_seq, eta, clip_x0, variance, generator, device, dtype,
            cuda_graph, progress, backend, batch_size) -> torch.Tensor:
    shape = _check_shape(shape)
    if not callable(model):
        raise TypeError(f"model must be callable as model(x_t, t), got {type(model).__name__}")
    if dtype not in validation.FLOAT_DTYPES:
        raise TypeError(f"dtype must be a floating dtype {validation.FLOAT_DTYPES}, got {dtype}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
    device = torch.device(device) if device is not None else _model_device(model)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    name = dispatch.choose(backend, torch.empty(0, dtype=dtype, device=device))
    use_graph = _use_graph(cuda_graph, device, name)
    if progress is None:
        progress = sys.stderr.isatty()

    chunk = shape[0] if batch_size is None else min(batch_size, shape[0])
    out = torch.empty(shape, dtype=dtype, device=device) if chunk < shape[0] else None
    graphs: dict[int, _StepLoop] = {}  # one captured loop per chunk size, reused with new keys
    bar = tqdm(total=len(t_seq) * -(-shape[0] // chunk), desc=f"{kind} sampling", disable=not progress,
               leave=False, unit="step")
    with torch.no_grad():
        for start in range(0, shape[0], chunk):
            cshape = (min(chunk, shape[0] - start), *shape[1:])
            x_key = NoiseKey.draw(cshape, dtype, device, generator)
            noise_seed = NoiseKey.draw(cshape, dtype, device, generator).seed
            x = x_key.materialize()
            if use_graph:
                loop = graphs.get(cshape[0])
                if loop is None:
                    loop = graphs[cshape[0]] = _StepLoop(kind, model, sched, x, t_seq, t_prev_seq, eta, clip_x0,
                                                         variance, name)
                    loop.capture()
                x = loop.run(x, noise_seed, bar)
            else:
                x = _eager_loop(kind, model, sched, x, noise_seed, t_seq, t_prev_seq, eta, clip_x0, variance,
                                name, bar)
            if out is None:
                out = x  # one chunk: no copy
            else:
                out[start:start + cshape[0]] = x
    bar.close()
    return out


def _use_graph(cuda_graph: bool | None, device: torch.device, backend: str) -> bool:
    if device.type != "cuda":
        return False  # CUDA graphs exist only on CUDA; CPU always runs eagerly
    fused = backend != "reference"
    if cuda_graph is None:
        return fused
    if cuda_graph and not fused:
        raise ValueError("cuda_graph=True needs a fused backend (the reference step draws its noise on the host)")
    return bool(cuda_graph)


def _eager_loop(kind, model, sched, x, noise_seed, t_seq, t_prev_seq, eta, clip_x0, variance, backend, bar):
    batch = x.shape[0]
    for i, (t, t_prev) in enumerate(zip(t_seq, t_prev_seq, strict=True)):
        noise = step_key(noise_seed, i, x.shape, x.dtype, x.device)
        eps = model(x, torch.full((batch,), t, dtype=torch.int64, device=x.device)).to(x.dtype)
        if kind == "ddpm":
            x = ops.ddpm_step(x, eps, t, sched, noise, clip_x0=clip_x0, variance=variance, backend=backend)
        else:
            x = ops.ddim_step(x, eps, t, t_prev, sched, eta, noise, clip_x0=clip_x0, backend=backend)
        bar.update(1)
    return x


class _StepLoop:
    """The device-resident state of one sampling loop, and its step as a graph-safe function.

    Static tensors on the device: ``x`` (the current sample), ``t_seq``/``t_prev_seq`` int64 (S,),
    ``key_base`` int64 (2,) = [seed, 0] and ``key_steps`` int64 (S, 2) = [0, i * calls_for(numel)]
    (bit patterns, see `isofast.noise.to_signed`), ``index`` int64 (1,) the step counter.
    `step` reads only these, so it can be captured once and replayed with new contents.
    """

    def __init__(self, kind, model, sched, x, t_seq, t_prev_seq, eta, clip_x0, variance, backend) -> None:
        if backend == "reference":
            raise ValueError("the static step loop needs a fused backend, got 'reference'")
        device = x.device
        self.kind, self.model, self.sched = kind, model, sched
        self.eta, self.clip_x0, self.variance, self.backend = eta, bool(clip_x0), variance, backend
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
        """One step x <- step(x, model(x, t_i), t_i, key_i); index += 1. Graph-safe: no host reads."""
        batch = self.x.shape[0]
        t = self.t_seq.index_select(0, self.index).expand(batch).contiguous()
        key = self.current_key()
        eps = self.model(self.x, t).to(self.x.dtype)
        if self.kind == "ddpm":
            x_prev = ddpm_step_keyed(self.x, eps, t, self.sched, None, key, self.clip_x0, self.variance, self.backend)
        else:
            t_prev = self.t_prev_seq.index_select(0, self.index).expand(batch).contiguous()
            x_prev = ddim_step_keyed(self.x, eps, t, t_prev, self.sched, self.eta, None, key, self.clip_x0,
                                     self.backend)
        self.x.copy_(x_prev)
        self.index.add_(1)

    def reset(self, x_T: torch.Tensor, noise_seed: int) -> None:
        """Load a new starting point and noise seed into the static tensors."""
        self.x.copy_(x_T)
        self.key_base.copy_(torch.tensor([to_signed(noise_seed), 0], dtype=torch.int64), non_blocking=False)
        self.index.zero_()

    def capture(self) -> None:
        """Warm up on a side stream (compiles kernels, sets up cuBLAS), then capture one step."""
        x_T = self.x.clone()
        # Shape errors surface here, eagerly, with the step op's clear messages (not inside capture).
        eps = self.model(self.x, self.t_seq[:1].expand(self.x.shape[0]).contiguous())
        validation.same_shape("model output eps_pred", eps, "x_t", self.x)
        side = torch.cuda.Stream(device=self.x.device)
        side.wait_stream(torch.cuda.current_stream(self.x.device))
        with torch.cuda.stream(side):
            for _ in range(_WARMUP_STEPS):
                self.index.zero_()
                self.step()
        torch.cuda.current_stream(self.x.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.step()
        self.x.copy_(x_T)  # capture records without running, but the warm-up moved x and index
        self.index.zero_()

    def run(self, x_T: torch.Tensor, noise_seed: int, bar) -> torch.Tensor:
        """The whole loop from x_T with step noise keyed by ``noise_seed``; returns a copy of x_0."""
        self.reset(x_T, noise_seed)
        for _ in range(self.num_steps):
            if self.graph is not None:
                self.graph.replay()
            else:
                self.step()  # uncaptured: the same step eagerly (how CPU tests exercise this path)
            bar.update(1)
        return self.x.clone()


def _available_fused_backends(device: torch.device) -> list[str]:
    """Fused backends that can run on ``device`` (for tests and `isofast info`-style reports)."""
    names = []
    for name in ("triton", "cpu", "cuda"):
        try:
            if backends.resolve(name, device) == name:
                names.append(name)
        except (RuntimeError, ValueError):
            pass
    return names
