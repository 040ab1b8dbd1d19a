"""Precision, recall, density and coverage of generated samples (Naeem et al., 2020), in bounded memory.

Definitions (the ``prdc`` package's, which this module reproduces): real samples X_i (i < N), fake
samples Y_j (j < M), Euclidean distances d, and the k-NN radius of a point within its own set,
excluding the point itself: r_i = distance from X_i to its k-th nearest other real sample, s_j the
same within the fakes. All comparisons are strict::

    precision = (1/M) sum_j  1[ exists i: d(X_i, Y_j) < r_i ]
    recall    = (1/N) sum_i  1[ exists j: d(X_i, Y_j) < s_j ]
    density   = (1/(k M)) sum_j sum_i 1[ d(X_i, Y_j) < r_i ]
    coverage  = (1/N) sum_i  1[ min_j d(X_i, Y_j) < r_i ]

Memory: no N x M (or N x N) matrix is ever built. Rows and columns are both tiled in blocks of at
most ``chunk_size``; every block of distances is reduced at once into per-point accumulators
(a running top-k per row for the radii, a per-fake count of real balls holding it, per-real
"covered" and "recalled" flags). Peak extra memory is a few ``chunk_size**2`` float64 blocks plus
two ``chunk_size x D`` float64 tiles plus O(N + M) accumulators, whatever N, M and D are: about
0.2 GB at the default chunk_size of 2048, so 50k x 50k runs of any dimension fit well under 2 GB
beyond the inputs themselves. Every distance block goes through :func:`_pairwise_distances`.

Precision of distances: computed in float64 by default. For D <= 32 each distance is summed
directly from coordinate differences (``torch.cdist`` without the matmul trick), so a pair's
distance does not depend on blocking and d(a, b) == d(b, a) bit for bit; above 32 dimensions the
cheaper expansion |a|^2 + |b|^2 - 2 a.b is used (relative error ~1e-16 |a|^2 / d^2 in float64).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["PRDCReference", "prdc"]

DEFAULT_CHUNK_SIZE = 2048
_DIRECT_MAX_DIM = 32


def _pairwise_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances of the rows of a (P, D) and b (Q, D), same float dtype: (P, Q)."""
    if a.shape[1] <= _DIRECT_MAX_DIM:
        return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")
    sq = a.pow(2).sum(1)[:, None] + b.pow(2).sum(1)[None, :]
    return sq.addmm_(a, b.T, alpha=-2.0).clamp_min_(0.0).sqrt_()


def _as_samples(x: object, name: str) -> tuple[torch.Tensor, bool]:
    """(tensor view of x, whether x came as a numpy array)."""
    from_numpy = isinstance(x, np.ndarray)
    if from_numpy:
        x = torch.as_tensor(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    if x.is_complex():
        raise TypeError(f"{name} must be real-valued, got {x.dtype}")
    if x.dim() != 2 or x.shape[1] == 0:
        raise ValueError(f"{name} must have shape (n_points, dim) with dim >= 1, got {tuple(x.shape)}")
    return x, from_numpy


def _blocks(n: int, chunk_size: int) -> list[slice]:
    return [slice(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]


def _check_finite(x: torch.Tensor, name: str, chunk_size: int) -> None:
    if x.is_floating_point():
        for rows in _blocks(x.shape[0], chunk_size):
            if not torch.isfinite(x[rows]).all():
                raise ValueError(f"{name} contains NaN or inf")


def _knn_radii(x: torch.Tensor, k: int, chunk_size: int, dtype: torch.dtype) -> torch.Tensor:
    """(N,) distance from each row of x to its k-th nearest other row, by tiles with a running top-k."""
    n = x.shape[0]
    blocks = _blocks(n, chunk_size)
    radii = torch.empty(n, dtype=dtype, device=x.device)
    for rows in blocks:
        xr = x[rows].to(dtype)
        best = None  # (rows, <= k) smallest distances seen so far, excluding self
        for cols in blocks:
            d = _pairwise_distances(xr, x[cols].to(dtype))
            if rows == cols:
                # Exclude self by position, not by value: duplicates of a point stay its neighbours.
                d.fill_diagonal_(float("inf"))
            vals = d.topk(min(k, d.shape[1]), dim=1, largest=False, sorted=False).values
            if best is not None:
                vals = torch.cat([best, vals], 1)
                vals = vals.topk(min(k, vals.shape[1]), dim=1, largest=False, sorted=False).values
            best = vals
        # n >= k + 1 leaves k finite distances per row: the self inf is never among the k smallest.
        radii[rows] = best.amax(1)
    return radii


def prdc(
    real: torch.Tensor | np.ndarray,
    fake: torch.Tensor | np.ndarray,
    k: int = 5,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    dtype: torch.dtype = torch.float64,
) -> dict[str, float]:
    """Precision, recall, density and coverage of ``fake`` against ``real`` (Naeem et al., 2020).

    See the module docstring for the formulas; they equal ``prdc.compute_prdc(real, fake, k)``.
    To score several fake sets against one real set, `PRDCReference` computes the real set's radii once.

    Args:
        real: (N, D) real samples (or features), torch tensor on any device, or numpy array.
        fake: (M, D) generated samples, same D; a numpy array follows ``real``'s device and vice versa.
        k: neighbourhood size of the k-NN radii, >= 1; needs N >= k + 1 and M >= k + 1.
        chunk_size: largest side of a block of distances (memory ~ a few chunk_size^2 floats).
        dtype: float64 (default, exact to rounding) or float32 (faster on GPUs) for the distances.

    Returns:
        dict with float values ``precision``, ``recall``, ``density``, ``coverage``.

    Raises:
        TypeError: non-array input, complex data, bad ``dtype``.
        ValueError: wrong shapes, different D, too few points for ``k``, NaN/inf (naming the set),
            bad ``k`` or ``chunk_size``, tensors on two different devices.
    """
    return PRDCReference(real, k, chunk_size, dtype).score(fake)


class PRDCReference:
    """One real set against which fake sets are scored: ``score(fake)`` equals ``prdc(real, fake, k, chunk_size,
    dtype)``, and the real set's k-NN radii (a third of the work) are computed once, at the first score, for all.
    The arguments and errors are `prdc`'s."""

    def __init__(self, real: torch.Tensor | np.ndarray, k: int = 5, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 dtype: torch.dtype = torch.float64) -> None:
        self.real, self._real_from_numpy = _as_samples(real, "real")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
            raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.k, self.chunk_size, self.dtype = int(k), int(chunk_size), dtype
        if self.real.shape[0] < self.k + 1:
            raise ValueError(f"real needs at least k + 1 = {self.k + 1} points, got {self.real.shape[0]}")
        self._radii: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # device -> (real there, radii)

    def _real_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The real set on ``device`` and its radii (checked finite and computed once per device)."""
        if device not in self._radii:
            real = self.real.to(device)
            _check_finite(real, "real", self.chunk_size)
            with torch.no_grad():
                self._radii[device] = (real, _knn_radii(real, self.k, self.chunk_size, self.dtype))
        return self._radii[device]

    def score(self, fake: torch.Tensor | np.ndarray) -> dict[str, float]:
        """`prdc` of ``fake`` against this real set."""
        fake, fake_from_numpy = _as_samples(fake, "fake")
        k, chunk_size, dtype = self.k, self.chunk_size, self.dtype
        if self.real.shape[1] != fake.shape[1]:
            raise ValueError(f"real and fake must have the same dim, got {self.real.shape[1]} and {fake.shape[1]}")
        if fake.shape[0] < k + 1:
            raise ValueError(f"fake needs at least k + 1 = {k + 1} points, got {fake.shape[0]}")
        device = self.real.device
        if fake.device != device:
            if self._real_from_numpy:
                device = fake.device
            elif fake_from_numpy:
                fake = fake.to(device)
            else:
                raise ValueError(f"real and fake are on different devices: {device} and {fake.device}")
        real, real_radii = self._real_on(device)
        _check_finite(fake, "fake", chunk_size)

        with torch.no_grad():
            fake_radii = _knn_radii(fake, k, chunk_size, dtype)

            n, m, device = real.shape[0], fake.shape[0], real.device
            balls_holding = torch.zeros(m, dtype=torch.int64, device=device)  # per fake: #real balls holding it
            covered = torch.zeros(n, dtype=torch.bool, device=device)  # real whose ball holds some fake
            recalled = torch.zeros(n, dtype=torch.bool, device=device)  # real inside some fake ball
            for rows in _blocks(n, chunk_size):
                xr = real[rows].to(dtype)
                for cols in _blocks(m, chunk_size):
                    d = _pairwise_distances(xr, fake[cols].to(dtype))
                    inside_real_ball = d < real_radii[rows, None]
                    # int32 partial sums are exact (a block has <= chunk_size rows) and much faster than int64.
                    balls_holding[cols] += inside_real_ball.sum(0, dtype=torch.int32)
                    covered[rows] |= inside_real_ball.any(1)
                    recalled[rows] |= (d < fake_radii[None, cols]).any(1)

            return {
                "precision": (balls_holding > 0).sum().item() / m,
                "recall": recalled.sum().item() / n,
                "density": balls_holding.sum().item() / (k * m),
                "coverage": covered.sum().item() / n,
            }
