"""PNG files of samples and figures, written atomically (`isofast.io`).

`write_samples`: a batch of samples as one picture, (B, C, H, W) images in [-1, 1] as a grid of
ceil(sqrt(B)) columns (small images enlarged, nearest neighbour, to at least `MIN_CELL_PX`, parted by white
lines), (B, 2) points as a scatter plot of every point over at least [-1.5, 1.5]^2. `save_figure`: any
matplotlib figure. matplotlib and torchvision are imported on first use.
"""
from __future__ import annotations

import math
from io import BytesIO
from pathlib import Path

import torch

from .io import atomic_write, atomic_write_bytes

__all__ = ["save_figure", "write_samples"]

MIN_CELL_PX = 64  # an 8x8 or 16x16 image drawn at 1:1 is a speck: grids draw each image at least this wide
_SEPARATOR_PX = 2


def write_samples(samples: torch.Tensor, path: str | Path, title: str | None = None) -> None:
    """Write samples as a PNG, atomically: (B, C, H, W) images in [-1, 1] as a grid; (B, 2) points as a scatter.

    title: the scatter plot's title, followed by the point count (default: the file name); image grids
    carry no title.
    """
    if not isinstance(samples, torch.Tensor):
        raise TypeError(f"sample_fn must return a torch.Tensor, got {type(samples).__name__}")
    samples = samples.detach().float().cpu()
    path = Path(path)
    if samples.ndim == 4 and samples.shape[1] in (1, 3):
        from torchvision.utils import save_image

        nrow = max(1, math.ceil(math.sqrt(samples.shape[0])))
        images = ((samples.clamp(-1, 1) + 1) / 2)
        scale = math.ceil(MIN_CELL_PX / max(images.shape[-2:]))
        if scale > 1:
            images = torch.nn.functional.interpolate(images, scale_factor=scale, mode="nearest")

        def write(tmp: Path) -> None:
            save_image(images, str(tmp), nrow=nrow, padding=_SEPARATOR_PX, pad_value=1.0, format="png")
    elif samples.ndim == 2 and samples.shape[1] == 2:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        # the usual view, widened to the farthest point: a sample that strayed is shown, not clipped away
        reach = max(1.5, 1.05 * float(samples.abs().max())) if len(samples) else 1.5
        label = f"{title or path.stem} ({len(samples):,} points)"

        def write(tmp: Path) -> None:
            fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
            ax.scatter(samples[:, 0].numpy(), samples[:, 1].numpy(), s=1, alpha=0.5)
            ax.set_xlim(-reach, reach)
            ax.set_ylim(-reach, reach)
            ax.set_aspect("equal")
            ax.set_title(label, fontsize=8)
            fig.savefig(tmp, format="png", bbox_inches="tight")
            plt.close(fig)
    else:
        raise ValueError(f"samples must be images (B, 1 or 3, H, W) or 2D points (B, 2), got {tuple(samples.shape)}")
    atomic_write(path, write)


def save_figure(fig, path: str | Path) -> None:
    """Write matplotlib figure ``fig`` as a PNG, atomically."""
    buffer = BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())
