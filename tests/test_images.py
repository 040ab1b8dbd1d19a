"""Tests of isofast.data.images: digits, image folders (with corrupt files), torchvision datasets when absent,
the transform, and the DataLoader helper."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from torch.utils.data import SequentialSampler

from isofast.data.images import (
    DigitsDataset,
    ImageFolderDataset,
    ImageTransform,
    make_dataloader,
    make_image_dataset,
)


def _random_image(rng: np.random.Generator, w: int, h: int, mode: str = "RGB") -> Image.Image:
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    return Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode)


def test_digits_are_the_sklearn_images_scaled_to_minus_one_one():
    ds = make_image_dataset("digits")
    raw = load_digits().images
    assert len(ds) == raw.shape[0]
    idx = [0, 17, len(ds) - 1]
    for i in idx:
        x = ds[i]
        assert x.shape == (1, 8, 8) and x.dtype == torch.float32
        np.testing.assert_allclose(x[0].numpy(), raw[i] / 8.0 - 1.0, rtol=0, atol=1e-7)
    allx = ds.images
    assert allx.min() == -1.0 and allx.max() == 1.0


def test_digits_resize_keeps_range_and_shape():
    ds = DigitsDataset(image_size=16)
    assert ds[3].shape == (1, 16, 16)
    assert ds.images.min() >= -1.0 and ds.images.max() <= 1.0
    with pytest.raises(ValueError, match="channels"):
        make_image_dataset("digits", channels=3)


def test_transform_centre_crops_scales_and_keeps_pixels_without_resize():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(4, 7, 3), dtype=np.uint8)  # H=4, W=7 -> crop columns 1..4
    x = ImageTransform(4, channels=3, random_flip=False)(Image.fromarray(arr))
    assert x.shape == (3, 4, 4)
    expected = torch.from_numpy(arr[:, 1:5].astype(np.float32)).permute(2, 0, 1) / 127.5 - 1.0
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-6)
    x_gray = ImageTransform(4, channels=1, random_flip=False)(Image.fromarray(arr))
    assert x_gray.shape == (1, 4, 4)
    ends = ImageTransform(2, random_flip=False)(Image.fromarray(np.array([[0, 255], [255, 0]], dtype=np.uint8)))
    assert ends.min() == -1.0 and ends.max() == 1.0


def test_transform_flip_gives_both_orientations():
    rng = np.random.default_rng(1)
    img = _random_image(rng, 8, 8)
    tf = ImageTransform(8, random_flip=True)
    plain = ImageTransform(8, random_flip=False)(img)
    torch.manual_seed(0)
    outs = [tf(img) for _ in range(40)]
    n_flipped = sum(torch.equal(o, plain.flip(-1)) for o in outs)
    n_plain = sum(torch.equal(o, plain) for o in outs)
    assert n_flipped + n_plain == 40 and 5 < n_flipped < 35


def test_transform_resizes_to_requested_size():
    rng = np.random.default_rng(2)
    x = ImageTransform(12, random_flip=False)(_random_image(rng, 40, 30))
    assert x.shape == (3, 12, 12) and x.min() >= -1.0 and x.max() <= 1.0


@pytest.fixture
def image_tree(tmp_path):
    rng = np.random.default_rng(3)
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    _random_image(rng, 20, 16).save(tmp_path / "a.png")
    _random_image(rng, 9, 9).save(tmp_path / "sub" / "b.PNG")
    _random_image(rng, 16, 24).save(tmp_path / "sub" / "deeper" / "c.jpg", quality=90)
    _random_image(rng, 10, 10, mode="L").save(tmp_path / "sub" / "d.bmp")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "garbage.png").write_bytes(b"this is not a png at all")
    buf = io.BytesIO()
    _random_image(rng, 32, 32).save(buf, format="PNG")
    (tmp_path / "sub" / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return tmp_path


def test_folder_skips_and_counts_unreadable_files(image_tree):
    with pytest.warns(UserWarning, match="skipped 2 unreadable"):
        ds = make_image_dataset("folder", root=image_tree, image_size=8)
    assert isinstance(ds, ImageFolderDataset)
    assert len(ds) == 4
    assert sorted(p.name for p, _ in ds.skipped) == ["garbage.png", "truncated.png"]
    for i in range(len(ds)):
        x = ds[i]
        assert x.shape == (3, 8, 8) and x.dtype == torch.float32
        assert -1.0 <= x.min() and x.max() <= 1.0


def test_folder_replaces_an_image_that_breaks_after_the_scan(image_tree):
    with pytest.warns(UserWarning):
        ds = ImageFolderDataset(image_tree, image_size=8, random_flip=False)
    ds.files[0].write_bytes(b"broken later")
    expected_next = ImageTransform(8, random_flip=False)(Image.open(ds.files[1]))
    with pytest.warns(UserWarning, match="could not decode"):
        x = ds[0]
    torch.testing.assert_close(x, expected_next)
    assert ds.late_failures == 1


def test_folder_without_images_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="no readable image"):
        make_image_dataset("folder", root=tmp_path)
    (tmp_path / "x.jpg").write_bytes(b"nope")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(FileNotFoundError, match="1 unreadable"):
            make_image_dataset("folder", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_image_dataset("folder", root=tmp_path / "missing")


@pytest.mark.parametrize("name,folder", [("flowers102", "flowers-102"), ("pets", "oxford-iiit-pet")])
def test_missing_torchvision_dataset_says_where_it_looked(tmp_path, name, folder):
    with pytest.raises(FileNotFoundError) as info:
        make_image_dataset(name, root=tmp_path)
    msg = str(info.value)
    assert str(tmp_path / folder) in msg and "--download" in msg and "--data-root" in msg


def test_pets_pools_both_splits_and_drops_labels(tmp_path):
    rng = np.random.default_rng(4)
    base = tmp_path / "oxford-iiit-pet"
    (base / "images").mkdir(parents=True)
    (base / "annotations").mkdir()
    names = {"trainval": ["Abyssinian_1", "beagle_2", "beagle_3"], "test": ["Abyssinian_4", "beagle_5"]}
    for split, ids in names.items():
        lines = []
        for k, image_id in enumerate(ids):
            _random_image(rng, 14, 11).save(base / "images" / f"{image_id}.jpg")
            cls = 1 if image_id.startswith("Aby") else 2
            lines.append(f"{image_id} {cls} {1 + k % 2} 1")
        (base / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    ds = make_image_dataset("pets", root=tmp_path, image_size=6)
    assert len(ds) == 5
    for i in range(5):
        assert isinstance(ds[i], torch.Tensor) and ds[i].shape == (3, 6, 6)
    assert ds[-1].shape == (3, 6, 6)
    with pytest.raises(IndexError):
        ds[5]


def test_make_image_dataset_rejects_bad_arguments():
    with pytest.raises(ValueError, match="cifar"):
        make_image_dataset("cifar")
    with pytest.raises(ValueError, match="root"):
        make_image_dataset("flowers102")
    with pytest.raises(ValueError, match="image_size"):
        make_image_dataset("digits", image_size=0)


def test_dataloader_yields_image_batches():
    ds = make_image_dataset("digits")
    dl = make_dataloader(ds, batch_size=64, shuffle=True, num_workers=0, pin_memory=False)
    batches = list(dl)
    assert len(batches) == len(ds) // 64
    assert all(b.shape == (64, 1, 8, 8) for b in batches)
    dl2 = make_dataloader(ds, batch_size=100, shuffle=True, num_workers=0, pin_memory=False,
                          sampler=SequentialSampler(ds), drop_last=False)
    first = next(iter(dl2))
    torch.testing.assert_close(first, ds.images[:100])
    with pytest.raises(ValueError, match="batch_size"):
        make_dataloader(ds, batch_size=5000, shuffle=False, num_workers=0, pin_memory=False)
