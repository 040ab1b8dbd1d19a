"""Stacked ensembles of the 2-D noise predictors: M members' parameters stacked as (M, *shape), run as bmm.

`EnsembleMLP` stacks `TimeMLP` members, `EnsembleAuthorsMLP` stacks `AuthorsMLP` members; member m of
either computes exactly what its own model computes (`member(m)` gives it back). Every weight is stacked
as its member's nn.Linear weight, (M, out, in), and a bias as (M, 1, out): member m's gradients are laid
out as its own model's, so a sum over them (the clipping norm) adds in its model's order. Both offer

    forward(x (M, B, d), t (M, B))           one timestep per row (training)
    forward_shared_t(x (M, B, d), t)         every row of member m at timestep t[m] (or one int t):
                                             the time terms are (M, 1, width), computed once and
                                             folded into the biases (per-batch training)
    predict_shared_t(x (M, B, d), t)         forward_shared_t without autograd, for sampling: one fused
                                             CPU kernel where isofast._C is built
    subset(members)                          the sub-ensemble of the given member indices (a copy)

`stack_members` picks the class for a list of models.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from .models.authors_mlp import AuthorsMLP, sinusoidal_encoding
from .models.embedding import timestep_embedding
from .models.mlp import TimeMLP
from .ops import extension

__all__ = ["EnsembleAuthorsMLP", "EnsembleMLP", "stack_members"]

# Rows per member per forward of predict_shared_t without the fused kernel: (M, chunk, hidden) activations stay
# in cache (all rows at once are memory-bound; measured: 512 is up to 1.7x slower, its buffers page-fault).
_SAMPLE_CHUNK = 256


def _check_members(members: Sequence[nn.Module], kind: type, fields: tuple[str, ...]) -> list:
    members = list(members)
    if not members or not all(isinstance(m, kind) for m in members):
        raise TypeError(f"members must be a non-empty sequence of {kind.__name__}")
    arch = tuple(getattr(members[0], f) for f in fields)
    for i, m in enumerate(members):
        if tuple(getattr(m, f) for f in fields) != arch:
            raise ValueError(f"members must share one architecture: member {i} differs from member 0")
    return members


def _stacker(members: list):
    def stack(get):
        return nn.Parameter(torch.stack([get(m).detach() for m in members]).clone())
    return stack


def _per_member_t(t: int | torch.Tensor, members: int, device: torch.device) -> torch.Tensor:
    """(M,) timesteps from one int or an (M,) tensor."""
    t = torch.as_tensor(t, device=device)
    return t.expand(members) if t.dim() == 0 else t


def _cpu_kernels_built(device: torch.device) -> bool:
    """True on a CPU where isofast._C (its CPU kernels) is built."""
    return device.type == "cpu" and extension.available("cpu")[0]


def _fused_kernels_apply(x: torch.Tensor) -> bool:
    """True where the fused CPU kernels of csrc/cpu/ensemble_mlp.cpp run: float32 on a CPU with isofast._C."""
    return x.dtype == torch.float32 and _cpu_kernels_built(x.device)


class _FusedTimeMLP(torch.autograd.Function):
    """EnsembleMLP's training forward and its parameters' gradients as two kernels, one task per member
    (csrc/cpu/ensemble_mlp.cpp): each member's activations stay in cache and the ~40 ops of the batched
    matmuls' graph are two calls. x and emb get no gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, emb: torch.Tensor, n_layers: int, *params: torch.Tensor) -> torch.Tensor:
        n = n_layers
        weights, projs, biases = list(params[:n]), list(params[n:2 * n]), list(params[2 * n:3 * n])
        out_weight, out_bias = params[3 * n], params[3 * n + 1]
        out, hidden = torch.ops.isofast_C.ensemble_mlp_train_forward(x, emb, weights, projs, biases, out_weight,
                                                                     out_bias)
        ctx.n_layers = n
        ctx.save_for_backward(x, emb, *hidden, *params[:3 * n], out_weight)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        n, saved = ctx.n_layers, ctx.saved_tensors
        x, emb, hidden = saved[0], saved[1], list(saved[2:2 + n])
        weights, projs, biases = (list(saved[2 + n + i * n:2 + n + (i + 1) * n]) for i in range(3))
        gw, gp, gb, g_out_w, g_out_b = torch.ops.isofast_C.ensemble_mlp_train_backward(
            grad.contiguous(), x, emb, hidden, weights, projs, biases, saved[-1])
        return (None, None, None, *gw, *gp, *gb, g_out_w, g_out_b)


Layers = list[tuple[torch.Tensor, torch.Tensor]]  # (weight (M, out, in), bias (M, 1, out)) per layer


def _t(w: torch.Tensor) -> torch.Tensor:
    """A stacked nn.Linear weight (M, out, in) as the right factor of h (M, B, in) @ w^T."""
    return w.transpose(1, 2)


def _run_layers(x: torch.Tensor, layers: Layers) -> torch.Tensor:
    """h <- relu(h w^T + b) through the layers, no ReLU after the last."""
    h, last = x, len(layers) - 1
    for i, (w, b) in enumerate(layers):
        h = torch.baddbmm(b, h, _t(w))
        if i < last:
            h = h.relu_()
    return h


class _Stacked(nn.Module):
    members: int
    data_dim: int

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def subset(self, members: Sequence[int]) -> _Stacked:
        """A copy holding only the given members (in that order)."""
        index = torch.as_tensor(list(members), dtype=torch.int64)
        if index.numel() == 0 or index.min() < 0 or index.max() >= self.members:
            raise ValueError(f"members must be indices in [0, {self.members}), got {list(members)}")
        out = copy.deepcopy(self)
        with torch.no_grad():
            for p in out.parameters():
                p.data = p.data[index.to(p.device)].clone()
        out.members = index.numel()
        return out

    def _shared_t_layers(self, t: torch.Tensor, dtype: torch.dtype) -> Layers:
        """The layers when every row of member m has timestep t[m] (M,): the time terms folded into the biases."""
        raise NotImplementedError

    def _member_layout(self) -> dict[str, torch.Tensor]:
        """{a member model's parameter name: this ensemble's stack of it}."""
        raise NotImplementedError

    def _new_member(self) -> nn.Module:
        """A fresh model of the members' architecture (on the CPU)."""
        raise NotImplementedError

    def member(self, m: int) -> nn.Module:
        """Member m as an ordinary model of its class (a copy of its weights)."""
        model, layout = self._new_member(), self._member_layout()
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(layout[name][m].reshape(p.shape))  # a bias is stacked (M, 1, out)
        return model.to(self.device)

    def member_parameters(self) -> list[torch.Tensor]:
        """The stacked parameters in the order of a member model's ``parameters()``: a sum over a member's
        parameters (its gradient norm) then adds in its own model's order."""
        layout = self._member_layout()
        return [layout[name] for name in self._member_names]

    def linear_weight_names(self) -> list[str]:
        """The names (in ``state_dict``) of the stacked nn.Linear weights: the parameters that saves of isofast
        before the member layout held transposed, (M, in, out)."""
        weights = {id(p) for name, p in self._member_layout().items() if name.endswith("weight")}
        return [name for name, p in self.named_parameters() if id(p) in weights]

    def forward_shared_t(self, x: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """eps_pred (M, B, d) when every row of member m has timestep t[m] (or the one int t)."""
        return _run_layers(x, self._shared_t_layers(_per_member_t(t, self.members, x.device), x.dtype))

    @torch.no_grad()
    def predict_shared_t(self, x: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """`forward_shared_t` without autograd (sampling). On a CPU where isofast._C is built, one fused kernel
        takes each block of a member's rows through every layer while it is in cache (csrc/cpu/ensemble_mlp.cpp);
        elsewhere the batched matmuls run in row chunks."""
        layers = self._shared_t_layers(_per_member_t(t, self.members, x.device), x.dtype)
        if _fused_kernels_apply(x):
            weights, biases = zip(*layers, strict=True)
            return torch.ops.isofast_C.ensemble_mlp_forward(x, list(weights), list(biases))
        rows = x.shape[1]
        return torch.cat([_run_layers(x[:, r:r + _SAMPLE_CHUNK], layers) for r in range(0, rows, _SAMPLE_CHUNK)],
                         dim=1)


class EnsembleMLP(_Stacked):
    """M `TimeMLP` members with stacked parameters; member m computes exactly what its TimeMLP does.

    Parameters (for layer l of n_layers, ``in_l`` = data_dim for l = 0, else hidden):
    ``weight_l`` (M, hidden, in_l), ``bias_l`` (M, 1, hidden), ``proj_l`` (M, hidden, emb_dim),
    ``out_weight`` (M, data_dim, hidden), ``out_bias`` (M, 1, data_dim): the TimeMLP's tensors stacked.
    """

    def __init__(self, members: Sequence[TimeMLP]) -> None:
        super().__init__()
        members = _check_members(members, TimeMLP, ("data_dim", "hidden", "n_layers", "emb_dim", "max_period"))
        first = members[0]
        self.data_dim, self.hidden, self.n_layers = first.data_dim, first.hidden, first.n_layers
        self.emb_dim, self.max_period, self.members = first.emb_dim, first.max_period, len(members)
        stack = _stacker(members)
        self.weight = nn.ParameterList(stack(lambda m, i=i: m.layers[i].weight) for i in range(self.n_layers))
        self.bias = nn.ParameterList(stack(lambda m, i=i: m.layers[i].bias[None]) for i in range(self.n_layers))
        self.proj = nn.ParameterList(stack(lambda m, i=i: m.time_proj[i].weight) for i in range(self.n_layers))
        self.out_weight = stack(lambda m: m.out.weight)
        self.out_bias = stack(lambda m: m.out.bias[None])
        self._member_names = [name for name, _ in first.named_parameters()]

    def _member_layout(self) -> dict[str, torch.Tensor]:
        layout = {"out.weight": self.out_weight, "out.bias": self.out_bias}
        for i in range(self.n_layers):
            layout |= {f"layers.{i}.weight": self.weight[i], f"layers.{i}.bias": self.bias[i],
                       f"time_proj.{i}.weight": self.proj[i]}
        return layout

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps_pred (M, B, d) for x (M, B, d) and timesteps t (M, B)."""
        M, B, _ = x.shape
        emb = self._embedding(t.reshape(-1)).to(x.dtype).view(M, B, -1)
        if _fused_kernels_apply(x) and not x.requires_grad:
            return _FusedTimeMLP.apply(x, emb, self.n_layers, *self.kernel_parameters())
        h = x
        for w, b, p in zip(self.weight, self.bias, self.proj, strict=True):
            # accumulated in place into one (M, B, hidden) buffer: no broadcast copy of the bias, no sum buffer
            h = torch.bmm(h, _t(w)).baddbmm_(emb, _t(p)).add_(b).relu_()
        return torch.bmm(h, _t(self.out_weight)).add_(self.out_bias)

    def _embedding(self, t: torch.Tensor) -> torch.Tensor:
        """timestep_embedding(t) for timesteps t (R,): on a CPU, integer timesteps are rows of a cached table, the
        same numbers (the embedding is elementwise in t); a gather instead of ~R x emb_dim sines and cosines.
        (On a GPU the table's range check would synchronise every step.)"""
        if t.numel() == 0 or t.is_floating_point() or t.device.type != "cpu":
            return timestep_embedding(t, self.emb_dim, self.max_period)
        low, high = (int(v) for v in torch.aminmax(t))
        if low < 0 or high >= 1 << 20:  # not a timestep table's row; timestep_embedding computes it as it is
            return timestep_embedding(t, self.emb_dim, self.max_period)
        return self.embedding_table(high + 1, t.device).index_select(0, t)

    def embedding_table(self, rows: int, device: torch.device) -> torch.Tensor:
        """(>= rows, emb_dim): row t is timestep_embedding(t) (cached; grown when more rows are asked for)."""
        table = getattr(self, "_embedding_table", None)
        if table is None or table.device != device or table.shape[0] < rows:
            steps = torch.arange(max(1024, rows), device=device)
            table = self._embedding_table = timestep_embedding(steps, self.emb_dim, self.max_period)
        return table

    def _shared_t_layers(self, t: torch.Tensor, dtype: torch.dtype) -> Layers:
        emb = timestep_embedding(t, self.emb_dim, self.max_period).to(dtype)[:, None]  # (M, 1, emb)
        return [*((w, torch.baddbmm(b, emb, _t(p))) for w, b, p in zip(self.weight, self.bias, self.proj, strict=True)),
                (self.out_weight, self.out_bias)]

    def _new_member(self) -> TimeMLP:
        return TimeMLP(self.data_dim, self.hidden, self.n_layers, self.emb_dim, self.max_period)

    def kernel_parameters(self) -> list[torch.Tensor]:
        """The parameters in the order the compiled training ops take (and return the gradients of) them:
        weights, projs, biases, out_weight, out_bias."""
        return [*self.weight, *self.proj, *self.bias, self.out_weight, self.out_bias]


class EnsembleAuthorsMLP(_Stacked):
    """M `AuthorsMLP` members with stacked parameters (each nn.Linear's weight (M, out, in), bias (M, 1, out)):
    ``weight``/``bias`` of the main layers, ``time_in_w``/``time_in_b`` and ``time_out_w``/``time_out_b`` of
    each layer's learned time embedding."""

    def __init__(self, members: Sequence[AuthorsMLP]) -> None:
        super().__init__()
        members = _check_members(members, AuthorsMLP, ("data_dim", "hidden", "n_layers", "emb_dim"))
        first = members[0]
        self.data_dim, self.hidden, self.n_layers, self.emb_dim = (first.data_dim, first.hidden, first.n_layers,
                                                                   first.emb_dim)
        self.members = len(members)
        stack, n = _stacker(members), len(first.layers)

        def linear(group: str):
            return (nn.ParameterList(stack(lambda m, i=i: getattr(m, group)[i].weight) for i in range(n)),
                    nn.ParameterList(stack(lambda m, i=i: getattr(m, group)[i].bias[None]) for i in range(n)))

        self.weight, self.bias = linear("layers")
        self.time_in_w, self.time_in_b = linear("time_in")
        self.time_out_w, self.time_out_b = linear("time_out")
        self._member_names = [name for name, _ in first.named_parameters()]

    def _member_layout(self) -> dict[str, torch.Tensor]:
        layout = {}
        for group, ws, bs in (("layers", self.weight, self.bias), ("time_in", self.time_in_w, self.time_in_b),
                              ("time_out", self.time_out_w, self.time_out_b)):
            for i, (w, b) in enumerate(zip(ws, bs, strict=True)):
                layout |= {f"{group}.{i}.weight": w, f"{group}.{i}.bias": b}
        return layout

    def _time_terms(self, t: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
        """Each layer's learned time embedding for timesteps t (M, R): a list of (M, R, width_l)."""
        M, R = t.shape
        e = sinusoidal_encoding(t.reshape(-1).to(torch.float32) + 1.0, self.emb_dim).to(dtype).view(M, R, -1)
        return [torch.baddbmm(cb, torch.baddbmm(ab, e, _t(aw)).relu_(), _t(cw))
                for aw, ab, cw, cb in zip(self.time_in_w, self.time_in_b, self.time_out_w, self.time_out_b,
                                          strict=True)]

    def _run(self, x: torch.Tensor, terms: list[torch.Tensor]) -> torch.Tensor:
        h, last = x, len(self.weight) - 1
        for i, (w, b, term) in enumerate(zip(self.weight, self.bias, terms, strict=True)):
            h = torch.baddbmm(b, h, _t(w)).add_(term)
            if i < last:
                h = h.relu_()
        return h

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps_pred (M, B, d) for x (M, B, d) and 0-based timesteps t (M, B)."""
        return self._run(x, self._time_terms(t, x.dtype))

    def _shared_t_layers(self, t: torch.Tensor, dtype: torch.dtype) -> Layers:
        terms = self._time_terms(t[:, None], dtype)  # (M, 1, width) each
        return [(w, b + term) for w, b, term in zip(self.weight, self.bias, terms, strict=True)]

    def _new_member(self) -> AuthorsMLP:
        return AuthorsMLP(self.data_dim, self.hidden, self.n_layers, self.emb_dim)


def stack_members(members: Sequence[nn.Module]) -> _Stacked:
    """The stacked ensemble of ``members`` (all TimeMLP or all AuthorsMLP, one architecture)."""
    members = list(members)
    if members and isinstance(members[0], AuthorsMLP):
        return EnsembleAuthorsMLP(members)
    return EnsembleMLP(members)
