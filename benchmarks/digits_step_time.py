"""How long one training step and one sampling step of the digits study's UNet take on this CPU, one thread.

The digits study (`python -m isofast.experiments.digits_study`) is sized from these two numbers:
CPU time ~ arms x steps x (train step) + seeds x passes x T x (sampling step of n samples), passes = the
lambda = 0 arm's temperatures + one per lambda > 0. ``python benchmarks/digits_step_time.py
[--base-channels 32 24 16] [--batch-size 128] [--n-samples 1000]`` prints, per width, the parameter count, the
CPU and wall milliseconds of a `Trainer.train_step` (lambda 0.3, iso_mode batch) and of one UNet forward over
``--n-samples`` images (what each sampler step costs).
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from isofast.experiments.digits_arm import digits_unet, split_digits
from isofast.train import TrainConfig, Trainer


def _timed(fn, repeats: int) -> tuple[float, float]:
    """(CPU s, wall s) per call, after one warm-up call."""
    fn()
    c0, w0 = time.process_time(), time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.process_time() - c0) / repeats, (time.perf_counter() - w0) / repeats


def measure(width: int, train: torch.Tensor, batch_size: int, n_samples: int, repeats: int) -> str:
    """One line: the parameters, a training step's and a sampling step's CPU and wall milliseconds."""
    model = digits_unet(0, base_channels=width)
    params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(model, train, TrainConfig(out_dir=tmp, steps=10**6, batch_size=batch_size, iso_lambda=0.3,
                                                    schedule="cosine", T=200, progress=False, tensorboard=False,
                                                    device="cpu"))
        train_cpu, train_wall = _timed(lambda: trainer.train_step(
            train[torch.randint(0, train.shape[0], (batch_size,), generator=gen)]), repeats)
    x, t = torch.randn(n_samples, 1, 8, 8), torch.full((n_samples,), 100)
    model.eval()
    with torch.no_grad():
        sample_cpu, sample_wall = _timed(lambda: model(x, t), max(1, repeats // 8))
    return (f"base {width}: {params} parameters; train step (batch {batch_size}): {train_cpu * 1e3:.1f} ms CPU "
            f"({train_wall * 1e3:.1f} wall); sampling step ({n_samples} samples): {sample_cpu * 1e3:.1f} ms CPU "
            f"({sample_wall * 1e3:.1f} wall)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-channels", nargs="+", type=int, default=[32, 24, 16])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--n-samples", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    train = split_digits(0.2, 0)["train"]
    for width in args.base_channels:
        print(measure(width, train, args.batch_size, args.n_samples, args.repeats), flush=True)


if __name__ == "__main__":
    main()
