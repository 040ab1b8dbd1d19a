"""PNG files of samples: a scatter of 2D points, a grid of images, and a clear refusal of anything else."""
import pytest
import torch

from isofast.plots import write_samples


def test_write_samples_scatter_and_refusal(tmp_path):
    write_samples(torch.randn(50, 2), tmp_path / "pts.png")
    assert (tmp_path / "pts.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="samples must be images"):
        write_samples(torch.randn(5, 7), tmp_path / "bad.png")


def test_write_samples_grid_of_images_leaves_no_temp(tmp_path):
    write_samples(torch.rand(5, 3, 8, 8) * 2 - 1, tmp_path / "grid.png")
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]
    with pytest.raises(TypeError, match="must return a torch.Tensor"):
        write_samples([[0.0, 0.0]], tmp_path / "list.png")


def _png_pixels(path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        return torch.from_numpy(np.array(image.convert("RGB")))


def test_small_images_are_upscaled_with_a_visible_separator(tmp_path):
    # 64 black 16x16 images: each cell is drawn at least 64 px wide (nearest), cells parted by white lines
    write_samples(-torch.ones(64, 1, 16, 16), tmp_path / "grid.png")
    pixels = _png_pixels(tmp_path / "grid.png")
    cell, pad = 64, 2
    assert pixels.shape[:2] == (8 * cell + 9 * pad, 8 * cell + 9 * pad)
    assert (pixels[:pad] == 255).all() and (pixels[pad + cell: 2 * pad + cell] == 255).all()  # separators
    assert (pixels[pad: pad + cell, pad: pad + cell] == 0).all()  # the first image, black


def test_scatter_plots_every_point_and_says_what_it_shows(tmp_path, monkeypatch):
    import matplotlib.axes

    seen = {}
    scatter, set_title, set_xlim = matplotlib.axes.Axes.scatter, matplotlib.axes.Axes.set_title, matplotlib.axes.Axes.set_xlim
    monkeypatch.setattr(matplotlib.axes.Axes, "set_xlim",
                        lambda ax, *a, **kw: seen.setdefault("xlim", a) and set_xlim(ax, *a, **kw))
    monkeypatch.setattr(matplotlib.axes.Axes, "scatter",
                        lambda ax, x, y, **kw: seen.setdefault("n", len(x)) and scatter(ax, x, y, **kw))
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title",
                        lambda ax, text, **kw: seen.setdefault("title", text) and set_title(ax, text, **kw))
    points = torch.randn(3000, 2)
    points[0] = torch.tensor([9.0, -7.0])  # far outside the usual [-1.5, 1.5] view: still drawn inside the axes
    write_samples(points, tmp_path / "pts.png", title="run swiss, step 300, λ = 0.3")
    assert seen["n"] == 3000
    assert seen["title"] == "run swiss, step 300, λ = 0.3 (3,000 points)"
    low, high = seen["xlim"]
    assert low <= -9.0 and high >= 9.0
