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
