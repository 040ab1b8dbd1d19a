"""M independent 2-D diffusion models trained and sampled as one batched ensemble.

A 2-D `TimeMLP` step is a few small matmuls: one model at a time, the machine spends its time
dispatching, not computing. Here M members are held as stacked parameters ((M, in, out) weights) and
run as batched matmuls (``torch.baddbmm``): one forward, one backward, one optimizer step for all.

Every member is exactly the single run of `isofast.train.Trainer` with its own seed (`EnsembleRun`
reproduces that run's streams): the same initial weights (``torch.manual_seed(seed); TimeMLP()``, or the
named model of `isofast.models.registry.MODELS_2D`; stacked by `isofast.ensemble_models`), data
order (`EpochOrder`), timesteps and noise keys (`make_noise_generator`), Adam state, gradient-norm
clipping, EMA and loss, with its own lambda. Members never share gradients: the loss is the sum of
the members' losses (`iso_ddpm_loss` with ``groups=M``), so member m's gradient is its own loss's.
Members may train on different datasets of one shape. On a CPU with the compiled kernels a member is its
single run bit for bit: every sum it takes (its layers, loss, clipping norm, Adam) is in that run's order,
and a TimeMLP ensemble's q_sample, forward, loss and backward are one call (``ensemble_mlp_train_step``).

Sampling (`ensemble_ddpm_sample`) runs every member's DDPM chain in one loop of fused steps; all
rows of a step share one t, so each member's time-embedding projections are computed once per step,
not once per row (`EnsembleMLP.predict_shared_t`: one fused CPU kernel per step where isofast._C is built).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import nn

from .data.order import EpochOrder, draw_timesteps, make_noise_generator
from .ensemble_adam import EnsembleAdam
from .ensemble_models import EnsembleAuthorsMLP, EnsembleMLP, _cpu_kernels_built, stack_members
from .models.registry import build_model_2d
from .noise import NoiseKey, calls_for, to_signed
from .ops import backends, extension, iso_ddpm_loss, operands, q_sample
from .ops.steps import ddpm_step_keyed
from .sampling import ddpm_timesteps
from .schedule import NoiseSchedule
from .train_config import TrainConfig

__all__ = ["EnsembleAuthorsMLP", "EnsembleMLP", "EnsembleRun", "ensemble_ddpm_sample", "kernel_draw", "kernel_draws"]

# The layout of the saved stacked weights: "member" = each member's nn.Linear weight, (M, out, in). Saves
# without the key are of isofast before it, which stacked the weights transposed, (M, in, out).
_LAYOUT = "member"


class EnsembleRun:
    """Train M members at once; member m is the single run of ``config`` with ``seed=seeds[m]``,
    ``iso_lambda=lambdas[m]`` on ``data[m]`` (the config's own seed and iso_lambda are not used).

    data: (M, N, d) float tensor, or a sequence of M (N, d) tensors. seeds: M ints. lambdas: M floats >= 0.
    config: a `TrainConfig` whose settings the members share: steps, batch_size, lr, betas, adam_eps,
    grad_clip, ema_decay, ema_warmup, timesteps, T, schedule, backend; Adam, mode "batch", fp32 and no LR
    warm-up (other settings are refused). model: a name of `MODELS_2D` ("mlp": `TimeMLP`).
    """

    def __init__(self, data, seeds: Sequence[int], lambdas: Sequence[float], config: TrainConfig,
                 device: torch.device | str = "cpu", model: str = "mlp") -> None:
        _check_config(config)
        self.config, self.device = config, torch.device(device)
        self.seeds, self.lambdas = [int(s) for s in seeds], [float(v) for v in lambdas]
        M = len(self.seeds)
        if M == 0:
            raise ValueError("seeds must name at least one member")
        if len(self.lambdas) != M:
            raise ValueError(f"lambdas must have one value per member: {len(self.lambdas)} values for {M} seeds")
        if any(not v >= 0 or v == float("inf") for v in self.lambdas):
            raise ValueError(f"lambdas must be finite and >= 0, got {self.lambdas}")
        self.data = _stack_data(data, M).to(self.device)
        N = self.data.shape[1]
        members = []
        for seed in self.seeds:
            torch.manual_seed(seed)  # the single run's initial weights
            members.append(build_model_2d(model, data_dim=self.data.shape[2]))
        self.model = stack_members(members).to(self.device)
        self.ema = stack_members(members).to(self.device).requires_grad_(False) if config.ema_decay > 0 else None
        # The Trainer's optimizer's numbers, so that members compute its run: on a CPU the per-tensor Adam,
        # bitwise, which EnsembleAdam.fused_step computes in one pass (with the clipping and the EMA).
        # (torch's fused CPU Adam rounds differently per memory layout, and Adam amplifies an ulp into
        # visibly different weights within a few hundred steps; see the equality test.)
        self._fused_adam = self.device.type == "cpu" and EnsembleAdam.fused_available()
        if self.device.type == "cpu":
            self.optimizer = EnsembleAdam(self.model.parameters(), lr=config.lr, betas=config.betas,
                                          eps=config.adam_eps)
        else:
            self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr, betas=config.betas,
                                              eps=config.adam_eps, fused=True)
        self.schedule = NoiseSchedule.from_name(config.schedule, config.T).to(self.device)
        self.orders = [EpochOrder(N, config.batch_size, s) for s in self.seeds]
        self.generators = [make_noise_generator(s) for s in self.seeds]
        # float64: each member's lambda exactly as its single run's float (the loss's tail computes in float64)
        self.lambda_tensor = torch.tensor(self.lambdas, dtype=torch.float64, device=self.device)
        # On a CPU with the compiled kernels a TimeMLP ensemble's forward, loss and backward are one call
        # (ensemble_mlp_train_step): the same arithmetic as the separate ops, without their dispatch and graph.
        self._fused_step = (isinstance(self.model, EnsembleMLP) and _cpu_kernels_built(self.device)
                            and backends.resolve(config.backend, self.device) == "cpu")
        self.step = 0
        self.loss_log: list[tuple[int, list[float]]] = []  # (step, each member's mean loss of the window)
        self._window: torch.Tensor | None = None  # the losses summed since the last log entry

    @property
    def members(self) -> int:
        return len(self.seeds)

    def _noise(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(t (M, B), eps (M, B, d)): each member's timesteps and noise, as its single run draws them."""
        ts, seeds = [], []
        for gen in self.generators:
            ts.append(draw_timesteps(self.config.T, shape[0], self.config.timesteps, gen))
            seeds.append(NoiseKey.draw_seed(gen))  # NoiseKey.draw's seed
        return torch.stack(ts).to(self.device), kernel_draws(seeds, 0, shape, self.device)

    def train_step(self) -> torch.Tensor:
        """One optimizer step of every member; returns the members' losses (M,), detached."""
        cfg, M, B = self.config, self.members, self.config.batch_size
        idx = torch.stack([order.indices(self.step) for order in self.orders]).to(self.device)  # (M, B)
        x0 = torch.gather(self.data, 1, idx.unsqueeze(-1).expand(-1, -1, self.data.shape[2]))
        t, eps = self._noise(tuple(x0.shape[1:]))
        known_norms: dict[int, torch.Tensor] = {}
        if self._fused_step:
            loss, known_norms = self._fused_loss_and_grads(x0, t, eps)
        else:
            rows = M * B
            x_t, _ = q_sample(x0.reshape(rows, -1), t.reshape(-1), self.schedule, eps.reshape(rows, -1),
                              backend=cfg.backend)
            eps_pred = self.model(x_t.view_as(x0), t)
            # one member is the ordinary loss: a float lambda (a tensor is one value per group, groups > 1 only)
            lam = self.lambda_tensor if M > 1 else float(self.lambdas[0])
            loss = iso_ddpm_loss(eps_pred.reshape(rows, -1), eps.reshape(rows, -1), lam, "batch",
                                 backend=cfg.backend, groups=M).reshape(M)
            self.optimizer.zero_grad(set_to_none=True)
            loss.sum().backward()  # member m's parameters get member m's loss's gradient, nothing else
        params = list(self.model.parameters())
        scale = (_clip_coefficients(self.model.member_parameters(), cfg.grad_clip, known_norms) if cfg.grad_clip
                 else None)
        ema = [] if self.ema is None else list(self.ema.parameters())
        decay = min(cfg.ema_decay, (1.0 + self.step) / (10.0 + self.step)) if cfg.ema_warmup else cfg.ema_decay
        if self._fused_adam:
            self.optimizer.fused_step(scale, ema, 1.0 - decay)
        else:
            if scale is not None:
                for p in params:
                    p.grad.mul_(scale.view(-1, *([1] * (p.ndim - 1))))
            self.optimizer.step()
            if ema:
                with torch.no_grad():
                    torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - decay)
        self.step += 1
        return loss.detach()

    def _fused_loss_and_grads(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor
                              ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The members' losses (M,), every parameter's .grad set to its members' gradients (one compiled call),
        and, when clipping, the per-member gradient norms the call took while they were in cache ({id(param):
        (M,)}, for the parameters whose per-member length is a multiple of torch's norm lane count)."""
        model = self.model
        sqrt_ab, sqrt_1mab = operands.table(self.schedule, "q_sample", x0)
        lanes = (_verified_norm_lanes() if self.config.grad_clip else None) or 0
        loss, gw, gp, gb, g_out_w, g_out_b, norms = torch.ops.isofast_C.ensemble_mlp_train_step(
            x0, eps, t, sqrt_ab, sqrt_1mab, model.embedding_table(self.config.T, self.device), self.lambda_tensor,
            list(model.weight), list(model.proj), list(model.bias), model.out_weight, model.out_bias, lanes)
        params = model.kernel_parameters()  # the order of the gradients the op returns
        for p, g in zip(params, [*gw, *gp, *gb, g_out_w, g_out_b], strict=True):
            p.grad = g
        known = {id(p): norms[:, i] for i, p in enumerate(params) if lanes and (p[0].numel() % lanes) == 0}
        return loss, known

    def fit(self, steps: int | None = None, progress: bool = False) -> EnsembleRun:
        """Train until ``steps`` (default: the config's) optimizer steps are done (one bar for all members)."""
        from tqdm.auto import tqdm

        steps = self.config.steps if steps is None else steps
        every = self.config.log_every
        with tqdm(total=steps, initial=self.step, desc=f"train {self.members} members", disable=not progress,
                  unit="step") as bar:
            while self.step < steps:
                loss = self.train_step()
                self._window = loss if self._window is None else self._window + loss
                if self.step % every == 0:  # the members' mean loss over the last `log_every` steps
                    self.loss_log.append((self.step, (self._window / every).tolist()))
                    self._window = None
                bar.update(1)
        return self

    @property
    def ema_model(self) -> nn.Module:
        return self.ema if self.ema is not None else self.model

    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue bit for bit (the data order needs no state)."""
        return {"step": self.step, "seeds": self.seeds, "lambdas": self.lambdas, "layout": _LAYOUT,
                "model": self.model.state_dict(), "ema": None if self.ema is None else self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(), "generators": [g.get_state() for g in self.generators],
                "loss_log": self.loss_log, "loss_window": self._window}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict`'s snapshot (also one saved before the member layout); refuses one of other
        members."""
        if state["seeds"] != self.seeds or state["lambdas"] != self.lambdas:
            raise ValueError(f"state is of members seeds={state['seeds']} lambdas={state['lambdas']}, this run "
                             f"has seeds={self.seeds} lambdas={self.lambdas}")
        if state.get("layout") is None:
            state = _from_transposed_layout(state, self.model)
        elif state["layout"] != _LAYOUT:
            raise ValueError(f"state has the weight layout {state['layout']!r}; this isofast reads {_LAYOUT!r}")
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        for g, s in zip(self.generators, state["generators"], strict=True):
            g.set_state(s)
        self.step = int(state["step"])
        self.loss_log = [(int(s), list(v)) for s, v in state["loss_log"]]
        self._window = state.get("loss_window")  # absent in saves made before it was kept


def _from_transposed_layout(state: dict, model: nn.Module) -> dict:
    """A state of isofast before the member layout (stacked nn.Linear weights as (M, in, out)) in the member
    layout: those weights, their EMA and their Adam moments transposed; nothing else changes."""
    names = set(model.linear_weight_names())
    index = {i for i, (name, _) in enumerate(model.named_parameters()) if name in names}

    def flip(tensors: dict) -> dict:
        return {k: v.transpose(1, 2).contiguous() if k in names else v for k, v in tensors.items()}

    optimizer = dict(state["optimizer"])
    optimizer["state"] = {i: {k: v.transpose(1, 2).contiguous() if i in index and k.startswith("exp_avg") else v
                              for k, v in entry.items()} for i, entry in optimizer["state"].items()}
    return {**state, "model": flip(state["model"]), "ema": None if state["ema"] is None else flip(state["ema"]),
            "optimizer": optimizer, "layout": _LAYOUT}


def _check_config(config: TrainConfig) -> None:
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    config.validate()
    unsupported = {"optimizer": "adam", "weight_decay": 0.0, "warmup_steps": 0, "iso_mode": "batch",
                   "precision": "fp32", "compile": False, "channels_last": False, "grad_accum": 1}
    bad = [f"{k}={getattr(config, k)!r}" for k, v in unsupported.items() if getattr(config, k) != v]
    if bad:
        raise ValueError(f"the ensemble engine trains with {unsupported}; config has {', '.join(bad)}")


def _stack_data(data, members: int) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        stacked = data
    else:
        parts = list(data)
        shapes = {tuple(p.shape) for p in parts}
        if len(shapes) != 1:
            raise ValueError(f"data: every member's dataset must have one shape (N, d), got {sorted(shapes)}")
        stacked = torch.stack(parts)
    if stacked.ndim != 3 or stacked.shape[0] != members or not stacked.is_floating_point():
        raise ValueError(f"data must be a float tensor (M, N, d) with M = {members} members (one per seed), "
                         f"got {stacked.dtype} of shape {tuple(stacked.shape)}")
    return stacked.float()


def kernel_draw(key: NoiseKey) -> torch.Tensor:
    """The draw of ``key`` as the fused kernels generate it (the CPU generator where built)."""
    if _cpu_kernels_built(key.device):
        like = torch.empty(key.shape, device=key.device)
        return extension.draw(like, to_signed(key.seed), to_signed(key.offset))
    return key.materialize(torch.float32)


def kernel_draws(seeds: Sequence[int], offset: int, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """(M, *shape): row m is ``kernel_draw(NoiseKey(seeds[m], offset, shape, device=device))``, in one call
    of the CPU generator where it is built (the members' Python-side draws were ~10% of a training step)."""
    if _cpu_kernels_built(device):
        numel = math.prod(shape)
        keys = torch.tensor([[to_signed(s), to_signed(offset)] for s in seeds], dtype=torch.int64)
        return torch.ops.isofast_C.philox_randn_rows(keys[:, 0], keys[:, 1], numel).view(len(seeds), *shape)
    return torch.stack([kernel_draw(NoiseKey(s, offset, tuple(shape), device=device)) for s in seeds])


def _clip_coefficients(params: list[torch.Tensor], max_norm: float,
                       known: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """(M,) each member's gradient coefficient of `torch.nn.utils.clip_grad_norm_` on its own model, bit for bit.

    params: the stacked parameters in the member model's order (`member_parameters`). A float sum depends on
    the order of its terms, and Adam amplifies a last-bit difference of the coefficient into visibly different
    weights within a few hundred steps: each gradient norm is over member m's contiguous slice, laid out as its
    model's gradient (the member layout), and the norm of the norms over a contiguous row (M, k) in the model's
    order, as clip_grad_norm_'s 1-D stack (a column of a (k, M) stack reduces in another order). known: per-member
    norms already taken ({id(param): (M,)}, the same sums: the training step's)."""
    known = known or {}
    norms = [known[id(p)] if id(p) in known else p.grad.flatten(1).norm(dim=1) for p in params if p.grad is not None]
    total = torch.stack(norms, dim=1).norm(dim=1)  # (M,)
    return (max_norm / (total + 1e-6)).clamp(max=1.0)


@functools.cache
def _verified_norm_lanes() -> int | None:
    """The lane count (8 or 16) with which the compiled norms (``member_grad_norms``, and the training step's)
    sum as torch.linalg.vector_norm does here, checked once on random data of several lengths and scales (the
    sums are data-independent, so a wrong lane count or a fused multiply-add shows at once); None when neither
    agrees: then torch computes every norm."""
    gen = torch.Generator().manual_seed(0)
    for lanes in (8, 16):
        agree = True
        for n in (16, 256, 4096, 16384 + 16):
            x = torch.randn(3, n, generator=gen) * 10.0 ** float(torch.randint(-4, 4, (1,), generator=gen))
            got = torch.ops.isofast_C.member_grad_norms([x], lanes)[:, 0]
            agree = agree and torch.equal(got, torch.stack([torch.linalg.vector_norm(row) for row in x]))
        if agree:
            return lanes
    return None


@torch.no_grad()
def ensemble_ddpm_sample(model: nn.Module, num: int, sched: NoiseSchedule, seeds: Sequence[int],
                         backend: str | None = None, progress: bool = False, temperature: float = 1.0
                         ) -> torch.Tensor:
    """(M, num, d) DDPM samples of every member (an `isofast.ensemble_models` ensemble): member m's equal
    `ddpm_sample(member m, (num, d), sched, generator=torch.Generator().manual_seed(seeds[m]))` to float32
    rounding (its x_T and step keys are drawn as there; the fused forward sums in another order than
    nn.Linear, and x_T is the kernels' draw of the key where ddpm_sample takes the reference's).

    temperature: tau > 0 scales x_T and every step's added noise (tau < 1 samples nearer the modes, the
    usual "lower temperature"); tau = 1 is the plain sampler, bit for bit.
    """
    from tqdm.auto import tqdm

    M, d = model.members, model.data_dim
    if len(seeds) != M:
        raise ValueError(f"seeds must have one value per member: {len(seeds)} for {M} members")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < 1e6:
        raise ValueError(f"temperature must be a float > 0, got {temperature!r}")
    device = model.device
    start_seeds, step_seeds = [], []
    for seed in seeds:
        gen = torch.Generator().manual_seed(int(seed))
        start_seeds.append(NoiseKey.draw((num, d), torch.float32, device, gen).seed)
        step_seeds.append(NoiseKey.draw((num, d), torch.float32, device, gen).seed)
    # x_T is the kernels' draw of ddpm_sample's key: the reference's values to float32 rounding (ddpm_sample
    # materialises it by the reference, 16 ms for 18 members of 10,000 points against 0.4 ms here).
    x = kernel_draws(start_seeds, 0, (num, d), device)
    scale = float(temperature) != 1.0
    if scale:
        x = x * temperature
    calls = calls_for(num * d)
    name = backends.resolve(backend, device, torch.float32)
    t_seq, _ = ddpm_timesteps(sched.T)
    for i, t in enumerate(tqdm(t_seq, desc=f"sample {M} members", disable=not progress, unit="step")):
        eps = model.predict_shared_t(x, t)
        # Each member's step noise is its own key's draw (the last step adds none: z is not read).
        z = kernel_draws(step_seeds, i * calls, (num, d), device) if t > 0 else torch.zeros_like(x)
        if scale:
            z = z * temperature
        # One row per member (all its points share t): the step's coefficients are looked up once per member,
        # not once per 2-D point, and its elementwise arithmetic is the same.
        tt = torch.full((M,), t, dtype=torch.int64, device=device)
        x = ddpm_step_keyed(x.view(M, num * d), eps.view(M, num * d), tt, sched, z.view(M, num * d), None, False,
                            "fixed_small", name).view(M, num, d)
    return x
