"""The ensemble rows: M 2-D models trained / sampled as one `isofast.ensemble` against the same M models one
after another with the single-model `Trainer` / `ddpm_sample` (the sequential sweep), and the floor.

The floor here is arithmetic, not bytes: the row counts the FLOPs of its matmuls (`model_macs`) and the
machine's fp32 matmul rate is measured in the same run (``torch.mm`` of 1024 x 1024), so every variant's
line says which fraction of that rate it reaches. The training step also moves every parameter through
Adam and the EMA (~40 bytes per parameter per step), a memory floor both engines share.

Both rows time both variants with glibc's freed memory retained (`retain_freed_memory`, as ``isofast toy2d``
runs the ensemble), set when a row is built (process-wide; these are the last rows). With glibc's adaptive
defaults the sequential sampler's time was the process's allocation history: 18 `ddpm_sample` runs took
0.96-1.4 s in one process and 2.1-2.3 s in another (5.7 million page faults against 0.44 million; same code,
same machine, 2026-12-01), so the ratio measured the page faults, not the engines.
"""
from __future__ import annotations

import tempfile
import time

import _harness as H
import torch
from _rows import Row, Settings, Target, Variant

from isofast.data.toy2d import make_dataset
from isofast.ensemble import EnsembleMLP, EnsembleRun, ensemble_ddpm_sample
from isofast.malloc_policy import retain_freed_memory
from isofast.models.mlp import TimeMLP
from isofast.sampling import ddpm_sample
from isofast.schedule import NoiseSchedule
from isofast.train import Trainer
from isofast.train_config import TrainConfig

TARGET = Target(vs_eager=8.0)  # the ensemble issue's goal on 2 CPU cores, M = 18


def matmul_rate(calls: int = 20) -> float:
    """fp32 FLOP/s of torch.mm on 1024 x 1024 matrices (this machine's practical matmul ceiling)."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    torch.mm(a, b)
    start = time.perf_counter()
    for _ in range(calls):
        torch.mm(a, b)
    return 2 * 1024**3 * calls / (time.perf_counter() - start)


def model_macs(model: TimeMLP, rows: int, shared_t: bool) -> int:
    """Multiply-adds of one forward of ``rows`` rows (time projections once, not per row, when shared_t)."""
    h, d, e, L = model.hidden, model.data_dim, model.emb_dim, model.n_layers
    per_row = d * h + (L - 1) * h * h + h * d
    return rows * per_row + (L * e * h if shared_t else rows * L * e * h)


def _allocator_note(retained: bool) -> str:
    return "freed memory retained (both variants)" if retained else "glibc's default allocator policy (not glibc?)"


def _config(out: str, batch: int, steps: int = 10**9, **kw) -> TrainConfig:
    base = dict(out_dir=out, steps=steps, batch_size=batch, iso_lambda=0.1, progress=False, tensorboard=False,
                log_every=10**6, ckpt_every=10**6)
    return TrainConfig(**{**base, **kw})


def train_row(settings: Settings, members: int, batch: int, rate: float) -> Row:
    """One optimizer step of every member: the ensemble against M Trainer steps."""
    retained = retain_freed_memory()
    tmp = tempfile.mkdtemp(prefix="isofast-bench-ensemble-")
    seeds = list(range(members))
    data = [make_dataset("swiss_roll", 10_000, seed=s) for s in seeds]
    run = EnsembleRun(data, seeds, [0.1] * members, _config(tmp, batch))
    trainers = []
    for s in seeds:
        torch.manual_seed(s)
        trainers.append(Trainer(TimeMLP(), data[s], _config(f"{tmp}/run{s}", batch, seed=s)))
    batches = [d[:batch] for d in data]

    def sequential(i):
        for trainer, x0 in zip(trainers, batches, strict=True):
            trainer.train_step(x0)

    def sequential_check():
        sequential(0)
        return "runs (each member's step is the Trainer's; equality is the next variant's check)"

    def ensemble_check():
        # 2 members x 5 steps against their single runs (the test suite checks 3 members x 200 steps)
        small = [make_dataset("moons", 256, seed=s) for s in (0, 1)]
        ens = EnsembleRun(small, [0, 1], [0.0, 0.3], _config(tmp + "/check", 32, steps=5)).fit()
        for m, lam in enumerate((0.0, 0.3)):
            torch.manual_seed(m)
            single = Trainer(TimeMLP(), small[m], _config(f"{tmp}/check{m}", 32, steps=5, seed=m, iso_lambda=lam))
            single.fit()
            for a, b in zip(ens.model.member(m).state_dict().values(), single.model.state_dict().values(),
                            strict=True):
                rel = float((a - b).norm() / b.norm())
                if rel > 1e-5:
                    raise AssertionError(f"member {m}'s weights differ from its single run by {rel:.1e} (relative)")
        return "2 members x 5 steps equal their single Trainer runs (relative norm <= 1e-5)"

    flops = members * 3 * 2 * model_macs(TimeMLP(), batch, shared_t=False)  # forward + backward (2x) per member
    variants = [Variant(f"{members} Trainer runs, 1 step each", "eager", sequential, sequential_check),
                Variant(f"isofast ensemble (M={members})", "isofast", lambda i: run.train_step(), ensemble_check)]
    return Row(f"ensemble train step/TimeMLP x{members}/batch {batch}", "ensemble",
               {"members": members, "batch": batch}, variants, 1, items=members, item_unit="member steps",
               target=TARGET, floor_note=f"{flops / 1e9:.3f} GFLOP per call; torch.mm rate {rate / 1e9:.1f} GFLOP/s; "
                                         f"{_allocator_note(retained)}",
               flops=flops, flop_rate=rate)


def sample_row(settings: Settings, members: int, num: int, steps: int, rate: float) -> Row:
    """``steps`` DDPM steps of every member's ``num`` points: the ensemble against M `ddpm_sample` runs."""
    retained = retain_freed_memory()
    torch.manual_seed(0)
    models = [TimeMLP().eval() for _ in range(members)]
    ens = EnsembleMLP(models)
    sched = NoiseSchedule.linear(T=steps)

    def sequential(i):
        for m, model in enumerate(models):
            ddpm_sample(model, (num, 2), sched, generator=torch.Generator().manual_seed(m), progress=False)

    def sequential_check():
        out = ddpm_sample(models[0], (64, 2), sched, generator=torch.Generator().manual_seed(0), progress=False)
        if not torch.isfinite(out).all():
            raise AssertionError("non-finite samples")
        return "finite (ddpm_sample is checked against the reference in its own row)"

    def ensemble_check():
        got = ensemble_ddpm_sample(EnsembleMLP(models[:2]), 64, sched, [0, 1])
        for m in range(2):
            want = ddpm_sample(models[m], (64, 2), sched, generator=torch.Generator().manual_seed(m), progress=False)
            H.assert_close("samples", got[m], want, 1e-5, 1e-5)
        return "2 members equal their ddpm_sample runs to 1e-5 (same keys)"

    flops = steps * members * 2 * model_macs(models[0], num, shared_t=True)
    variants = [Variant(f"{members} ddpm_sample runs", "eager", sequential, sequential_check),
                Variant(f"isofast ensemble (M={members})", "isofast",
                        lambda i: ensemble_ddpm_sample(ens, num, sched, list(range(members))), ensemble_check)]
    return Row(f"ensemble sampling/TimeMLP x{members}/{num}x2/{steps} steps", "ensemble",
               {"members": members, "num": num, "steps": steps}, variants, 1, items=members * num * steps,
               item_unit="point steps", target=TARGET,
               floor_note=f"{flops / 1e9:.3f} GFLOP per call (time projections once per step and member); "
                          f"torch.mm rate {rate / 1e9:.1f} GFLOP/s; {_allocator_note(retained)}", flops=flops,
               flop_rate=rate)
