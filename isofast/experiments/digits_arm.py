"""One arm of the digits study (`digits_study`): the data split, the UNet, training, tempered sampling, PRDC.

An arm is one (lambda, seed): a small UNet built right after ``torch.manual_seed(seed)`` and trained by
`isofast.train.Trainer` with the fused loss (iso_mode "batch") on the training digits, then sampled by
DDPM at each temperature tau it is asked for. Arms of one seed share the initial weights, the data order,
the timesteps and noise of training and the sampler's x_T and step noise (common random numbers), so the
difference between lambdas of one seed is the penalty's.

Temperature tau (`tempered_ddpm_sample`): x_T and every step's added noise are scaled by tau; tau = 1 is
`isofast.sampling.ddpm_sample` with ``generator=torch.Generator().manual_seed(seed)``, bit for bit.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..ensemble import kernel_draw  # the draw of a key as the fused step kernels generate it
from ..models.unet import UNet, UNetConfig
from ..noise import NoiseKey
from ..ops import backends
from ..ops.steps import ddpm_step_keyed
from ..sampling import ddpm_timesteps, step_key
from ..schedule import NoiseSchedule

__all__ = ["REFERENCES", "digits_unet", "prdc_rows", "split_digits", "tempered_ddpm_sample"]

REFERENCES = ("test", "train")  # held-out digits; a subset of the training digits of the same size
METRICS = ("precision", "recall", "density", "coverage")


def split_digits(test_fraction: float, split_seed: int) -> dict[str, torch.Tensor]:
    """scikit-learn's 1797 digits (1, 8, 8) in [-1, 1], split at random (generator seeded by ``split_seed``):
    {"train": (N - n_test, 1, 8, 8), "test": (n_test, ...), "train_ref": n_test of the training digits}
    with n_test = round(test_fraction * 1797). The same split for every arm."""
    from ..data.images import DigitsDataset

    images = DigitsDataset(image_size=8).images
    gen = torch.Generator().manual_seed(split_seed)
    order = torch.randperm(images.shape[0], generator=gen)
    n_test = round(test_fraction * images.shape[0])
    test, train = images[order[:n_test]], images[order[n_test:]]
    # the training reference has as many points as the held-out one: PRDC's radii depend on N
    train_ref = train[torch.randperm(train.shape[0], generator=gen)[:n_test]]
    return {"train": train.contiguous(), "test": test.contiguous(), "train_ref": train_ref.contiguous()}


def digits_unet(seed: int, **overrides) -> UNet:
    """The study's UNet on 8x8x1 (defaults: 2 levels 8 and 4, 16 channels, 1 ResBlock per level, no attention),
    initialised after ``torch.manual_seed(seed)`` so every lambda of a seed starts from the same weights."""
    fields = dict(image_size=8, in_channels=1, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                  attention_resolutions=(), dropout=0.0, norm_groups=8, mid_attention=False)
    fields.update(overrides)
    torch.manual_seed(seed)
    return UNet(UNetConfig(**fields))


@torch.no_grad()
def tempered_ddpm_sample(model: nn.Module, shape: Sequence[int], sched: NoiseSchedule, seed: int,
                         temperature: float = 1.0, clip_x0: bool = True, backend: str | None = None,
                         progress: bool = False) -> torch.Tensor:
    """(B, ...) DDPM samples (posterior variance, the mean at the last step) with x_T and every step's added
    noise scaled by ``temperature`` (tau > 0). The keys are drawn as `ddpm_sample` draws them from
    ``torch.Generator().manual_seed(seed)``, so every tau of a seed shares its noise directions.
    clip_x0: clamp each step's x0 estimate to [-1, 1], as DDPM's image sampler does (Ho et al.'s
    ``clip_denoised``); without it a few chains of a short-trained model run away at the noisiest steps
    (where 1/sqrt(ab_t) is large), and one such sample dominates the mean squared norm."""
    from tqdm.auto import tqdm

    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be a finite float > 0, got {temperature!r}")
    shape = tuple(int(s) for s in shape)
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(int(seed))
    x = NoiseKey.draw(shape, torch.float32, device, gen).materialize()
    noise_seed = NoiseKey.draw(shape, torch.float32, device, gen).seed
    scale = float(temperature) != 1.0  # tau = 1 multiplies by nothing: the plain sampler's arithmetic
    if scale:
        x = x * temperature
    name = backends.resolve(backend, device, torch.float32)
    t_seq, _ = ddpm_timesteps(sched.T)
    for i, t in enumerate(tqdm(t_seq, desc=f"sample tau={temperature:g}", disable=not progress, leave=False,
                               unit="step")):
        tt = torch.full((shape[0],), t, dtype=torch.int64, device=device)
        eps = model(x, tt)
        z = kernel_draw(step_key(noise_seed, i, shape, device=device)) if t > 0 else torch.zeros_like(x)
        if scale:
            z = z * temperature
        # the step ops take (B, n) rows
        x = ddpm_step_keyed(x.reshape(shape[0], -1), eps.reshape(shape[0], -1), tt, sched, z.reshape(shape[0], -1),
                            None, bool(clip_x0), "fixed_small", name).reshape(shape)
    return x


def prdc_rows(samples: torch.Tensor, refs: dict[str, torch.Tensor], k: int, **keys) -> list[dict]:
    """One row per reference set: ``keys`` + PRDC (k) on flattened pixels + the samples' mean squared norm
    (NaN metrics when a sample is not finite)."""
    from ..metrics.prdc import prdc

    flat = samples.reshape(samples.shape[0], -1).double()
    finite = bool(torch.isfinite(flat).all())
    sq_norm = float(flat.square().sum(1).mean())
    rows = []
    for ref, real in refs.items():
        metrics = prdc(real.reshape(real.shape[0], -1).double(), flat, k=k) if finite else dict.fromkeys(
            METRICS, math.nan)
        rows.append({**keys, "reference": ref, **{m: float(metrics[m]) for m in METRICS}, "sample_sq_norm": sq_norm})
    return rows
