"""The 2-D ensemble engine against the same members trained and sampled one after another.

    python benchmarks/ensemble.py                  # M = 18 members, 2-D swiss roll, paper model and batch
    python benchmarks/ensemble.py --members 4 --train-steps 20 --sample-steps 5 --threads 1

Measured side by side in one process, on the same data: training steps/s of `isofast.ensemble.EnsembleRun`
(all M members per step) against `isofast.train.Trainer` steps of one member (the sequential sweep runs M of
them), and DDPM sampling steps/s of `ensemble_ddpm_sample` (every member's points at once) against
`ddpm_sample` of one member. The floor: this machine's fp32 matmul rate (``torch.mm`` of 1024 x 1024, in the
same run), the FLOPs of a training step and of a sampling step counted from the model's matmuls, and the
fraction of that rate the ensemble reaches. Prints a table and writes benchmarks/results/ensemble-<device>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from _rows_ensemble import matmul_rate, model_macs  # noqa: E402  (shared with throughput.py's ensemble rows)

from isofast.data.toy2d import make_dataset  # noqa: E402
from isofast.ensemble import EnsembleMLP, EnsembleRun, ensemble_ddpm_sample  # noqa: E402
from isofast.models.mlp import TimeMLP  # noqa: E402
from isofast.sampling import ddpm_sample  # noqa: E402
from isofast.schedule import NoiseSchedule  # noqa: E402
from isofast.train import Trainer  # noqa: E402
from isofast.train_config import TrainConfig  # noqa: E402


def _seconds_per_call(fn, calls: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--members", type=int, default=18, help="M (default 18: 6 lambdas x 3 seeds)")
    p.add_argument("--batch-size", type=int, default=64, help="training batch per member (default 64, the paper's)")
    p.add_argument("--train-steps", type=int, default=50, help="timed training steps (default 50)")
    p.add_argument("--num", type=int, default=10_000, help="samples per member (default 10,000)")
    p.add_argument("--sample-steps", type=int, default=10, help="timed sampling steps (default 10)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/ensemble-<device>.json)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    M, B = args.members, args.batch_size
    print(f"isofast ensemble benchmark: M={M}, batch {B}, {args.num} samples per member, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)

    rate = matmul_rate()
    data = [make_dataset("swiss_roll", 10_000, seed=s) for s in range(M)]
    lambdas = [(0.0, 0.01, 0.05, 0.1, 0.2, 0.3)[m % 6] for m in range(M)]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(out_dir=tmp, steps=10**9, batch_size=B, progress=False, tensorboard=False)
        ensemble = EnsembleRun(data, list(range(M)), lambdas, cfg)
        ens_train = _seconds_per_call(ensemble.train_step, args.train_steps)
        torch.manual_seed(0)
        single = Trainer(TimeMLP(), data[0], TrainConfig(out_dir=os.path.join(tmp, "single"), steps=10**9,
                                                         batch_size=B, iso_lambda=0.1, progress=False,
                                                         tensorboard=False))
        x0 = data[0][:B]
        single_train = _seconds_per_call(lambda: single.train_step(x0), args.train_steps)

    members = [TimeMLP() for _ in range(M)]
    sched = NoiseSchedule.linear(T=args.sample_steps)
    ens_model = EnsembleMLP(members)
    ens_sample = _seconds_per_call(lambda: ensemble_ddpm_sample(ens_model, args.num, sched, list(range(M))), 1)
    ens_sample /= args.sample_steps
    single_sample = _seconds_per_call(
        lambda: ddpm_sample(members[0], (args.num, 2), sched, generator=torch.Generator().manual_seed(0)), 1)
    single_sample /= args.sample_steps

    model = members[0]
    train_flops = M * 3 * 2 * model_macs(model, B, shared_t=False)  # forward + backward (2x) per member
    sample_flops = M * 2 * model_macs(model, args.num, shared_t=True)
    rows = {
        "train": {"ensemble_steps_per_s": 1 / ens_train, "sequential_steps_per_s": 1 / (M * single_train),
                  "ratio": M * single_train / ens_train, "flops_per_step": train_flops,
                  "fraction_of_matmul_rate": train_flops / ens_train / rate},
        "sample": {"ensemble_steps_per_s": 1 / ens_sample, "sequential_steps_per_s": 1 / (M * single_sample),
                   "ratio": M * single_sample / ens_sample, "flops_per_step": sample_flops,
                   "fraction_of_matmul_rate": sample_flops / ens_sample / rate},
    }
    print(f"\nmatmul rate (torch.mm 1024^2, fp32): {rate / 1e9:.1f} GFLOP/s")
    print(f"{'phase':<7} {'ensemble step':>14} {'M single steps':>15} {'ratio':>7} {'GFLOP/step':>11} {'of mm rate':>10}")
    for name, (ens_s, single_s) in {"train": (ens_train, single_train), "sample": (ens_sample, single_sample)}.items():
        r = rows[name]
        print(f"{name:<7} {ens_s * 1e3:>11.2f} ms {M * single_s * 1e3:>12.2f} ms {r['ratio']:>6.1f}x "
              f"{r['flops_per_step'] / 1e9:>11.3f} {r['fraction_of_matmul_rate']:>9.0%}")
    device = platform.processor() or platform.machine()
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"ensemble-cpu-{torch.get_num_threads()}t.json")
    record = {"command": " ".join(["python", "benchmarks/ensemble.py", *(argv if argv is not None else sys.argv[1:])]),
              "machine": {"processor": device, "cpus": os.cpu_count(), "threads": torch.get_num_threads()},
              "torch": torch.__version__, "members": M, "batch_size": B, "num": args.num,
              "matmul_flops_per_s": rate, "rows": rows, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(record, f, indent=1)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
