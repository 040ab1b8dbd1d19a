"""Named 2-D protocols for `isofast toy2d --protocol NAME`: how data, model, training and evaluation are set.

* ``isofast``: isofast's own setup (the default sweep's): 10,000 points, `TimeMLP`, batch 512, 3,000 steps,
  EMA 0.999, gradient clipping at 1, one timestep per sample, PRDC against fresh points of the dataset.
* ``authors2024``: the authors' 2024 code: swiss roll ``make_swiss_roll(5000, noise=0.5)`` (the other
  datasets from isofast's generators at 5,000 points), a random 80/20 train/test split (4,000 training
  points), batch 64 with the tail dropped, 1000 epochs (62,000 steps), Adam 1e-3, no EMA, no clipping,
  `AuthorsMLP`, one timestep per batch (what their loop did in effect), PRDC against the held-out points.
* ``authors2025``: the authors' 2025 code: 10,000 points, data noise 0.1 (swiss roll
  ``make_swiss_roll(noise=0.1)``; the others already use 0.1), batch 512, 100,000 steps, Adam 1e-3, no EMA,
  no clipping, a ReLU MLP 2-128-128-128-2 with a 128-dim time embedding (`TimeMLP`), one timestep per
  sample, PRDC against the training points themselves.

All three: linear betas 1e-4 .. 0.02, T = 1000, DDPM ancestral sampling with the posterior variance and
the mean at the last step, 10,000 samples, PRDC with k = 5. Every field can be overridden (`--steps`,
`--timesteps`, `--data-noise`, `--n-points`, `--ema-decay`, `--grad-clip`, `--model`, `--eval-against`, ...).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ..data.order import TIMESTEP_MODES, mix_seed
from ..data.toy2d import DATA_NOISE, make_dataset
from ..models.registry import MODELS_2D
from ..train_config import TrainConfig
from .toy2d import REAL_SEED_OFFSET

__all__ = ["PROTOCOLS", "REFERENCES", "Protocol", "member_data", "reference_points"]

REFERENCES = ("fresh", "train", "test")
_SPLIT_STREAM = 0x5B17  # the train/test split's generator: seeded from (run seed, this tag)


@dataclass(frozen=True)
class Protocol:
    """One protocol. n_points: points generated per run (before the split). data_noise: the data noise of
    the datasets that have one (None: each dataset's default). test_fraction: share held out as the
    ``test`` reference (0: no split). references: the reference sets PRDC is computed against."""

    name: str
    n_points: int
    data_noise: float | None
    test_fraction: float
    batch_size: int
    steps: int
    lr: float
    ema_decay: float
    grad_clip: float
    model: str
    timesteps: str
    references: tuple[str, ...]
    n_eval: int = 10_000
    k: int = 5
    T: int = 1000

    def validate(self) -> None:
        """Raise ValueError naming the first bad field (as the CLI option that sets it)."""
        def positive_int(flag: str, v) -> None:
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{flag} must be an int >= 1, got {v!r}")

        for flag, v in (("--n-points", self.n_points), ("--batch-size", self.batch_size), ("--steps", self.steps),
                        ("--n-eval", self.n_eval), ("k", self.k)):
            positive_int(flag, v)
        if self.data_noise is not None and not (isinstance(self.data_noise, (int, float))
                                                and 0 <= self.data_noise < math.inf):
            raise ValueError(f"--data-noise must be a finite float >= 0, got {self.data_noise!r}")
        if not 0 <= self.test_fraction < 1:
            raise ValueError(f"test_fraction must be in [0, 1), got {self.test_fraction!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"--lr must be a finite float > 0, got {self.lr!r}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"--ema-decay must be in [0, 1) (0: no EMA), got {self.ema_decay!r}")
        if not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise ValueError(f"--grad-clip must be a finite float >= 0 (0: no clipping), got {self.grad_clip!r}")
        if self.model not in MODELS_2D:
            raise ValueError(f"--model: unknown model {self.model!r}; valid names: {', '.join(MODELS_2D)}")
        if self.timesteps not in TIMESTEP_MODES:
            raise ValueError(f"--timesteps must be one of {', '.join(TIMESTEP_MODES)}, got {self.timesteps!r}")
        if not self.references or any(r not in REFERENCES for r in self.references):
            raise ValueError(f"--eval-against must name one or more of {', '.join(REFERENCES)}, "
                             f"got {list(self.references)}")
        if "test" in self.references and self.test_fraction == 0:
            raise ValueError(f"--eval-against test: protocol {self.name!r} holds no test split "
                             "(only authors2024 does); use fresh or train")
        n_train = self.n_train
        if n_train < max(self.batch_size, self.k + 1):
            raise ValueError(f"--n-points {self.n_points} leaves {n_train} training points, fewer than "
                             f"--batch-size {self.batch_size} (or k + 1)")

    @property
    def n_train(self) -> int:
        return self.n_points - round(self.n_points * self.test_fraction)

    def train_config(self, out_dir: str, backend: str | None = None) -> TrainConfig:
        """The `TrainConfig` every member of this protocol's ensemble shares (seed and lambda are per member)."""
        return TrainConfig(out_dir=out_dir, steps=self.steps, batch_size=self.batch_size, lr=self.lr, T=self.T,
                           ema_decay=self.ema_decay, grad_clip=self.grad_clip or None, timesteps=self.timesteps,
                           backend=backend, progress=False, tensorboard=False, log_every=max(1, self.steps // 200))

    def with_overrides(self, **overrides) -> Protocol:
        """This protocol with the non-None ``overrides`` (field names) replaced."""
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"unknown protocol field(s) {unknown}")
        values = {k: (tuple(v) if k == "references" else v) for k, v in overrides.items() if v is not None}
        return dataclasses.replace(self, **values)


PROTOCOLS: dict[str, Protocol] = {
    "isofast": Protocol("isofast", n_points=10_000, data_noise=None, test_fraction=0.0, batch_size=512, steps=3000,
                        lr=1e-3, ema_decay=0.999, grad_clip=1.0, model="mlp", timesteps="per-sample",
                        references=("fresh",)),
    "authors2024": Protocol("authors2024", n_points=5000, data_noise=None, test_fraction=0.2, batch_size=64,
                            steps=1000 * (4000 // 64), lr=1e-3, ema_decay=0.0, grad_clip=0.0, model="authors_mlp",
                            timesteps="per-batch", references=("test",)),
    "authors2025": Protocol("authors2025", n_points=10_000, data_noise=0.1, test_fraction=0.0, batch_size=512,
                            steps=100_000, lr=1e-3, ema_decay=0.0, grad_clip=0.0, model="mlp",
                            timesteps="per-sample", references=("train",)),
}


def _noise_for(protocol: Protocol, dataset: str) -> float | None:
    return protocol.data_noise if dataset in DATA_NOISE else None


def member_data(protocol: Protocol, dataset: str, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(train, test) points of the run with ``seed``: the dataset drawn with that seed, then a random split
    (a permutation seeded from the run seed; test is None without a split)."""
    points = make_dataset(dataset, protocol.n_points, seed=seed, noise=_noise_for(protocol, dataset))
    if protocol.test_fraction == 0:
        return points, None
    perm = torch.randperm(protocol.n_points, generator=torch.Generator().manual_seed(mix_seed(seed, _SPLIT_STREAM)))
    n_test = protocol.n_points - protocol.n_train
    return points[perm[n_test:]], points[perm[:n_test]]


def reference_points(protocol: Protocol, kind: str, dataset: str, seed: int, train: torch.Tensor,
                     test: torch.Tensor | None) -> torch.Tensor:
    """The reference set ``kind`` of REFERENCES for the run with ``seed``."""
    if kind == "fresh":
        return make_dataset(dataset, protocol.n_eval, seed=REAL_SEED_OFFSET + seed,
                            noise=_noise_for(protocol, dataset))
    if kind == "train":
        return train
    if kind == "test" and test is not None:
        return test
    raise ValueError(f"unknown or unavailable reference {kind!r} (valid: {', '.join(REFERENCES)})")
