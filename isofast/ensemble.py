"""M independent 2-D diffusion models trained and sampled as one batched ensemble.

A 2-D `TimeMLP` step is a few small matmuls: one model at a time, the machine spends its time
dispatching, not computing. Here M members are held as stacked parameters ((M, in, out) weights) and
run as batched matmuls (``torch.baddbmm``): one forward, one backward, one optimizer step for all.

Every member is exactly the single run of `isofast.train.Trainer` with its own seed (`EnsembleRun`
reproduces that run's streams): the same initial weights (``torch.manual_seed(seed); TimeMLP()``), data
order (`EpochOrder`), timesteps and noise keys (`make_noise_generator`), Adam state, gradient-norm
clipping, EMA and loss, with its own lambda. Members never share gradients: the loss is the sum of
the members' losses (`iso_ddpm_loss` with ``groups=M``), so member m's gradient is its own loss's.
Members may train on different datasets of one shape.

Sampling (`ensemble_ddpm_sample`) runs every member's DDPM chain in one loop of fused steps; all
rows of a step share one t, so each member's time-embedding projections are computed once per step,
not once per row (`EnsembleMLP.forward_shared_t`).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .data.order import EpochOrder, make_noise_generator
from .models.embedding import timestep_embedding
from .models.mlp import TimeMLP
from .noise import NoiseKey, calls_for, to_signed
from .ops import backends, extension, iso_ddpm_loss, q_sample
from .ops.steps import ddpm_step_keyed
from .sampling import ddpm_timesteps
from .schedule import NoiseSchedule
from .train_config import TrainConfig

__all__ = ["EnsembleMLP", "EnsembleRun", "ensemble_ddpm_sample"]

_SAMPLE_CHUNK = 512  # rows per member per forward when sampling


class EnsembleMLP(nn.Module):
    """M `TimeMLP` members with stacked parameters; member m computes exactly what its TimeMLP does.

    Parameters (for layer l of n_layers, ``in_l`` = data_dim for l = 0, else hidden):
    ``weight_l`` (M, in_l, hidden), ``bias_l`` (M, 1, hidden), ``proj_l`` (M, emb_dim, hidden),
    ``out_weight`` (M, hidden, data_dim), ``out_bias`` (M, 1, data_dim): the TimeMLP's weights transposed.
    """

    def __init__(self, members: Sequence[TimeMLP]) -> None:
        super().__init__()
        members = list(members)
        if not members or not all(isinstance(m, TimeMLP) for m in members):
            raise TypeError("members must be a non-empty sequence of TimeMLP")
        first = members[0]
        arch = (first.data_dim, first.hidden, first.n_layers, first.emb_dim, first.max_period)
        for i, m in enumerate(members):
            if (m.data_dim, m.hidden, m.n_layers, m.emb_dim, m.max_period) != arch:
                raise ValueError(f"members must share one architecture: member {i} differs from member 0")
        self.data_dim, self.hidden, self.n_layers, self.emb_dim, self.max_period = arch
        self.members = len(members)

        def stack(get):
            return nn.Parameter(torch.stack([get(m).detach() for m in members]).clone())

        self.weight = nn.ParameterList(stack(lambda m, i=i: m.layers[i].weight.t()) for i in range(self.n_layers))
        self.bias = nn.ParameterList(stack(lambda m, i=i: m.layers[i].bias[None]) for i in range(self.n_layers))
        self.proj = nn.ParameterList(stack(lambda m, i=i: m.time_proj[i].weight.t()) for i in range(self.n_layers))
        self.out_weight = stack(lambda m: m.out.weight.t())
        self.out_bias = stack(lambda m: m.out.bias[None])

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps_pred (M, B, d) for x (M, B, d) and timesteps t (M, B)."""
        M, B, _ = x.shape
        emb = timestep_embedding(t.reshape(-1), self.emb_dim, self.max_period).to(x.dtype).view(M, B, -1)
        h = x
        for w, b, p in zip(self.weight, self.bias, self.proj, strict=True):
            # accumulated in place into one (M, B, hidden) buffer: no broadcast copy of the bias, no sum buffer
            h = torch.bmm(h, w).baddbmm_(emb, p).add_(b).relu_()
        return torch.bmm(h, self.out_weight).add_(self.out_bias)

    def forward_shared_t(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """eps_pred (M, B, d) for x (M, B, d) when every row has timestep ``t``: the time projections
        are (M, 1, hidden), computed once and folded into the biases."""
        emb = timestep_embedding(torch.tensor([t], device=x.device), self.emb_dim, self.max_period).to(x.dtype)
        h = x
        for w, b, p in zip(self.weight, self.bias, self.proj, strict=True):
            h = torch.bmm(h, w).add_(b + torch.matmul(emb, p)).relu_()
        return torch.bmm(h, self.out_weight).add_(self.out_bias)

    def member(self, m: int) -> TimeMLP:
        """Member m as an ordinary TimeMLP (a copy of its weights)."""
        model = TimeMLP(self.data_dim, self.hidden, self.n_layers, self.emb_dim, self.max_period)
        with torch.no_grad():
            for i in range(self.n_layers):
                model.layers[i].weight.copy_(self.weight[i][m].t())
                model.layers[i].bias.copy_(self.bias[i][m, 0])
                model.time_proj[i].weight.copy_(self.proj[i][m].t())
            model.out.weight.copy_(self.out_weight[m].t())
            model.out.bias.copy_(self.out_bias[m, 0])
        return model.to(self.out_weight.device)


class EnsembleRun:
    """Train M members at once; member m is the single run of ``config`` with ``seed=seeds[m]``,
    ``iso_lambda=lambdas[m]`` on ``data[m]`` (the config's own seed and iso_lambda are not used).

    data: (M, N, d) float tensor, or a sequence of M (N, d) tensors. seeds: M ints. lambdas: M floats >= 0.
    config: a `TrainConfig` whose settings the members share: steps, batch_size, lr, betas, adam_eps,
    grad_clip, ema_decay, ema_warmup, T, schedule, backend; Adam, mode "batch", fp32 and no LR warm-up
    (other settings are refused).
    """

    def __init__(self, data, seeds: Sequence[int], lambdas: Sequence[float], config: TrainConfig,
                 device: torch.device | str = "cpu") -> None:
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
            members.append(TimeMLP(data_dim=self.data.shape[2]))
        self.model = EnsembleMLP(members).to(self.device)
        self.ema = EnsembleMLP(members).to(self.device).requires_grad_(False) if config.ema_decay > 0 else None
        # The Trainer's optimizer, so that members compute its numbers: on a CPU the per-tensor Adam. (The
        # fused CPU Adam is 6x faster here, but rounds differently per memory layout, and Adam amplifies an
        # ulp into visibly different weights within a few hundred steps; see the equality test.)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr, betas=config.betas,
                                          eps=config.adam_eps, fused=self.device.type == "cuda")
        self.schedule = NoiseSchedule.from_name(config.schedule, config.T).to(self.device)
        self.orders = [EpochOrder(N, config.batch_size, s) for s in self.seeds]
        self.generators = [make_noise_generator(s) for s in self.seeds]
        self.lambda_tensor = torch.tensor(self.lambdas, device=self.device)
        self.step = 0

    @property
    def members(self) -> int:
        return len(self.seeds)

    def _noise(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(t (M, B), eps (M, B, d)): each member's timesteps and noise, as its single run draws them."""
        ts, eps = [], []
        for gen in self.generators:
            ts.append(torch.randint(0, self.config.T, (shape[0],), generator=gen))
            key = NoiseKey.draw(shape, torch.float32, self.device, gen)
            eps.append(_draw(key))
        return torch.stack(ts).to(self.device), torch.stack(eps)

    def train_step(self) -> torch.Tensor:
        """One optimizer step of every member; returns the members' losses (M,), detached."""
        cfg, M, B = self.config, self.members, self.config.batch_size
        idx = torch.stack([order.indices(self.step) for order in self.orders]).to(self.device)  # (M, B)
        x0 = torch.gather(self.data, 1, idx.unsqueeze(-1).expand(-1, -1, self.data.shape[2]))
        t, eps = self._noise(tuple(x0.shape[1:]))
        rows = M * B
        x_t, _ = q_sample(x0.reshape(rows, -1), t.reshape(-1), self.schedule, eps.reshape(rows, -1),
                          backend=cfg.backend)
        eps_pred = self.model(x_t.view_as(x0), t)
        loss = iso_ddpm_loss(eps_pred.reshape(rows, -1), eps.reshape(rows, -1), self.lambda_tensor, "batch",
                             backend=cfg.backend, groups=M)
        self.optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()  # member m's parameters get member m's loss's gradient, nothing else
        if cfg.grad_clip:
            _clip_per_member(list(self.model.parameters()), cfg.grad_clip)
        self.optimizer.step()
        if self.ema is not None:
            decay = min(cfg.ema_decay, (1.0 + self.step) / (10.0 + self.step)) if cfg.ema_warmup else cfg.ema_decay
            with torch.no_grad():
                torch._foreach_lerp_(list(self.ema.parameters()), [p.detach() for p in self.model.parameters()],
                                     1.0 - decay)
        self.step += 1
        return loss.detach()

    def fit(self, steps: int | None = None, progress: bool = False) -> EnsembleRun:
        """Train until ``steps`` (default: the config's) optimizer steps are done (one bar for all members)."""
        from tqdm.auto import tqdm

        steps = self.config.steps if steps is None else steps
        with tqdm(total=steps, initial=self.step, desc=f"train {self.members} members", disable=not progress,
                  unit="step") as bar:
            while self.step < steps:
                self.train_step()
                bar.update(1)
        return self

    @property
    def ema_model(self) -> EnsembleMLP:
        return self.ema if self.ema is not None else self.model


def _check_config(config: TrainConfig) -> None:
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    config.validate()
    unsupported = {"optimizer": "adam", "weight_decay": 0.0, "warmup_steps": 0, "iso_mode": "batch",
                   "precision": "fp32", "compile": False, "channels_last": False}
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


def _draw(key: NoiseKey) -> torch.Tensor:
    """The draw of ``key`` as the fused kernels generate it (the CPU generator where built)."""
    if key.device.type == "cpu" and extension.available("cpu")[0]:
        like = torch.empty(key.shape, device=key.device)
        return extension.draw(like, to_signed(key.seed), to_signed(key.offset))
    return key.materialize(torch.float32)


def _clip_per_member(params: list[torch.Tensor], max_norm: float) -> None:
    """`torch.nn.utils.clip_grad_norm_` of each member on its own: the norm over member m's slices."""
    grads = [p.grad for p in params if p.grad is not None]
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads]).norm(dim=0)  # (M,)
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.view(-1, *([1] * (g.ndim - 1))))


@torch.no_grad()
def ensemble_ddpm_sample(model: EnsembleMLP, num: int, sched: NoiseSchedule, seeds: Sequence[int],
                         backend: str | None = None, progress: bool = False) -> torch.Tensor:
    """(M, num, d) DDPM samples of every member: member m's equal `ddpm_sample(member m, (num, d), sched,
    generator=torch.Generator().manual_seed(seeds[m]))` (its x_T and step keys are drawn as there)."""
    from tqdm.auto import tqdm

    M, d = model.members, model.data_dim
    if len(seeds) != M:
        raise ValueError(f"seeds must have one value per member: {len(seeds)} for {M} members")
    device = model.out_weight.device
    x, step_seeds = [], []
    for seed in seeds:
        gen = torch.Generator().manual_seed(int(seed))
        x.append(NoiseKey.draw((num, d), torch.float32, device, gen).materialize())
        step_seeds.append(NoiseKey.draw((num, d), torch.float32, device, gen).seed)
    x = torch.stack(x)
    calls, rows = calls_for(num * d), M * num
    name = backends.resolve(backend, device, torch.float32)
    t_seq, _ = ddpm_timesteps(sched.T)
    for i, t in enumerate(tqdm(t_seq, desc=f"sample {M} members", disable=not progress, unit="step")):
        # In row chunks: (M, chunk, hidden) activations stay in cache (all rows at once are memory-bound).
        eps = torch.cat([model.forward_shared_t(x[:, r:r + _SAMPLE_CHUNK], t) for r in range(0, num, _SAMPLE_CHUNK)],
                        dim=1)
        # Each member's step noise is its own key's draw (the last step adds none: z is not read).
        z = torch.stack([_draw(NoiseKey(s, i * calls, (num, d), device=device)) for s in step_seeds]) if t > 0 \
            else torch.zeros_like(x)
        tt = torch.full((rows,), t, dtype=torch.int64, device=device)
        x = ddpm_step_keyed(x.view(rows, d), eps.view(rows, d), tt, sched, z.view(rows, d), None, False,
                            "fixed_small", name).view(M, num, d)
    return x
