"""Fréchet Inception Distance and Inception Score from Inception features.

FID (Heusel et al. 2017), between Gaussians fitted to two feature sets::

    FID = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))

with ``mu`` the mean and ``S`` the unbiased covariance (``np.cov``, divisor N-1) of the (N, 2048) pool
features, all in float64, the matrix square root by ``scipy.linalg.sqrtm`` — the computation of pytorch-fid and
of the original TensorFlow code: when the product is singular enough that ``sqrtm`` returns non-finite values,
``eps·I`` is added to both covariances; a small imaginary part from rounding is dropped, a large one is an error.

Inception Score (Salimans et al. 2016), as torch-fidelity computes it (and, with ``shuffle=False``, the original
``improved-gan`` code): ``p(y|x) = softmax(logits)`` over the 1008 classes of the bias-free logits, in float64;
the samples, in a fixed pseudo-random order (``np.random.RandomState(seed).permutation(N)``, seed 2020), are cut
into ``splits`` contiguous chunks ``[k N / splits, (k+1) N / splits)``; in each chunk
``p(y) = mean_x p(y|x)`` and ``IS_k = exp(mean_x KL(p(y|x) || p(y)))``; the result is the mean and the
(population) standard deviation of the ``IS_k``. Terms with ``p(y|x) = 0`` (underflow) count as 0, where
torch-fidelity's expression would give NaN; otherwise the two agree to rounding.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from scipy import linalg
from tqdm.auto import tqdm

__all__ = [
    "extract_features",
    "feature_statistics",
    "fid_from_features",
    "frechet_distance",
    "inception_score",
]


def _as_float64(a: object, name: str) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    arr = np.asarray(a, dtype=np.float64)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def feature_statistics(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(N, d) features -> (mu (d,), sigma (d, d)) in float64: the mean and the unbiased covariance."""
    f = _as_float64(features, "features")
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must have shape (N >= 2, d), got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(
    mu1: np.ndarray | torch.Tensor,
    sigma1: np.ndarray | torch.Tensor,
    mu2: np.ndarray | torch.Tensor,
    sigma2: np.ndarray | torch.Tensor,
    eps: float = 1e-6,
) -> float:
    """Fréchet distance ``||mu1-mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2))`` between N(mu1, S1) and N(mu2, S2).

    mu: (d,), sigma: (d, d); computed in float64. If ``sqrtm(S1 S2)`` is not finite it is recomputed as
    ``sqrtm((S1 + eps I)(S2 + eps I))``; an imaginary part with a diagonal entry above 1e-3 raises ValueError.
    """
    mu1, mu2 = np.atleast_1d(_as_float64(mu1, "mu1")), np.atleast_1d(_as_float64(mu2, "mu2"))
    sigma1, sigma2 = np.atleast_2d(_as_float64(sigma1, "sigma1")), np.atleast_2d(_as_float64(sigma2, "sigma2"))
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"mu1 and mu2 must be vectors of one length, got {mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]
    for name, s in (("sigma1", sigma1), ("sigma2", sigma2)):
        if s.shape != (d, d):
            raise ValueError(f"{name} must have shape ({d}, {d}), got {s.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(d) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm(sigma1 sigma2) has an imaginary component of {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid_from_features(
    features1: np.ndarray | torch.Tensor,
    features2: np.ndarray | torch.Tensor,
    min_samples: int = 2048,
) -> float:
    """FID between two (N_i, d) feature sets (e.g. Inception pool features, d = 2048).

    Fewer than ``min_samples`` rows on either side raises ValueError: with N <= d the covariance is singular
    and the FID is biased far above its large-sample value (the standard protocol uses 10k-50k samples).
    Lower ``min_samples`` only for tests.
    """
    for name, f in (("features1", features1), ("features2", features2)):
        n = len(f)
        if n < min_samples:
            raise ValueError(f"{name} has {n} samples; FID needs at least min_samples={min_samples} per side")
    mu1, s1 = feature_statistics(features1)
    mu2, s2 = feature_statistics(features2)
    return frechet_distance(mu1, s1, mu2, s2)


def inception_score(
    logits: np.ndarray | torch.Tensor,
    splits: int = 10,
    shuffle: bool = True,
    seed: int = 2020,
) -> tuple[float, float]:
    """Inception Score (mean, std) over ``splits`` chunks of (N, C) logits (C = 1008); formula in the module doc.

    ``shuffle=True, seed=2020`` orders the samples as torch-fidelity does; ``shuffle=False`` keeps their order
    (the original code). Needs ``N >= splits``.
    """
    x = _as_float64(logits, "logits")
    if x.ndim != 2:
        raise ValueError(f"logits must have shape (N, C), got {x.shape}")
    if not isinstance(splits, int) or splits < 1:
        raise ValueError(f"splits must be a positive int, got {splits!r}")
    n = x.shape[0]
    if n < splits:
        raise ValueError(f"logits has {n} samples, fewer than splits={splits}")
    if shuffle:
        x = x[np.random.RandomState(seed).permutation(n)]
    t = torch.from_numpy(x)
    log_p = torch.log_softmax(t, dim=1)
    p = log_p.exp()
    scores = []
    for k in range(splits):
        lo, hi = k * n // splits, (k + 1) * n // splits
        p_k, log_p_k = p[lo:hi], log_p[lo:hi]
        log_marginal = torch.log(p_k.mean(dim=0, keepdim=True))
        # 0·log(0/q) = 0: classes whose probability underflows to 0 contribute nothing (not 0·inf = NaN).
        kl = torch.where(p_k > 0, p_k * (log_p_k - log_marginal), 0.0).sum(dim=1)
        scores.append(math.exp(kl.mean().item()))
    return float(np.mean(scores)), float(np.std(scores))


def _batches(images: torch.Tensor | Iterable, batch_size: int) -> Iterator[torch.Tensor]:
    """Re-chunk images into (<= batch_size, C, H, W) tensors from a tensor, batches, single images, or
    (image, label) pairs."""
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
        yield from images.split(batch_size)
        return
    pending: list[torch.Tensor] = []
    for item in images:
        if isinstance(item, (tuple, list)):
            item = item[0]  # labelled loaders yield (images, labels)
        if not isinstance(item, torch.Tensor) or item.dim() not in (3, 4):
            raise TypeError("images must yield (C,H,W) or (B,C,H,W) tensors (or tuples starting with one), "
                            f"got {type(item).__name__} {getattr(item, 'shape', '')}")
        if item.dim() == 3:
            pending.append(item)
            if len(pending) == batch_size:
                yield torch.stack(pending)
                pending = []
        else:
            yield from item.split(batch_size)
    if pending:
        yield torch.stack(pending)


@torch.inference_mode()
def extract_features(
    images: torch.Tensor | Iterable,
    model: torch.nn.Module,
    batch_size: int = 50,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Run the FID Inception ``model`` over ``images``; returns (pool (N, 2048), logits (N, 1008)) float32 numpy.

    images: an (N, C, H, W) tensor, or any iterable (DataLoader, dataset, generator) of (B, C, H, W) batches,
    of (C, H, W) images, or of tuples whose first element is one of those; values in the model's
    ``input_range``. ``model``: ``load_inception(...)`` (moved to ``device`` here). A tqdm bar counts images.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    device = torch.device(device)
    model = model.to(device).eval()
    total = len(images) if hasattr(images, "__len__") and not isinstance(images, torch.utils.data.DataLoader) else None
    if isinstance(images, torch.utils.data.DataLoader) and hasattr(images.dataset, "__len__"):
        total = len(images.dataset)
    pools, logits = [], []
    with tqdm(total=total, unit="img", desc="inception features", disable=not progress) as bar:
        for batch in _batches(images, batch_size):
            pool, logit = model(batch.to(device, non_blocking=True))
            pools.append(pool.float().cpu())
            logits.append(logit.float().cpu())
            bar.update(batch.shape[0])
    if not pools:
        raise ValueError("images is empty")
    return torch.cat(pools).numpy(), torch.cat(logits).numpy()
