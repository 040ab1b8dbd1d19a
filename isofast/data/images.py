"""Image datasets for unconditional training: every item is one image tensor, no label.

Every dataset yields float32 tensors of shape ``(C, S, S)`` with values in ``[-1, 1]`` (``C`` = 3 for RGB,
1 for grayscale; ``S`` = ``image_size``). The preprocessing of a PIL image (``ImageTransform``):

1. convert to RGB (or L for one channel);
2. centre-crop to a square of side ``min(width, height)``;
3. resize to ``S x S`` (PIL bicubic, which low-pass filters when shrinking);
4. with ``random_flip``, flip left-right with probability 1/2 (torch's RNG, so DataLoader workers differ);
5. scale ``u8 -> u8 / 127.5 - 1``.

Sources (``make_image_dataset(name, ...)``):

* ``"digits"`` — scikit-learn's bundled 8x8 handwritten digits (1797 images, no download, the embedded
  default): values 0..16 mapped by ``v / 8 - 1`` to ``[-1, 1]``, 1 channel, bilinearly resized when
  ``image_size != 8``; no flip by default (a mirrored digit is not a digit).
* ``"flowers102"`` — Oxford Flowers 102 through ``torchvision.datasets.Flowers102``; train, val and test
  splits pooled (8189 images). Expects ``<root>/flowers-102/``.
* ``"pets"`` — Oxford-IIIT Pet through ``torchvision.datasets.OxfordIIITPet``; trainval and test pooled
  (7349 images). Expects ``<root>/oxford-iiit-pet/``.
* ``"folder"`` — every image under ``root``, recursively (extensions in ``IMAGE_EXTENSIONS``, any case),
  sorted by path.

Unreadable images in a folder: at construction every file is opened and ``PIL.Image.verify``-ed (cheap:
headers and, for PNG, chunk checksums; with ``full_check=True`` every image is fully decoded, which also
catches truncated JPEGs). Files that fail are left out, listed in ``dataset.skipped`` as ``(path, reason)``
and counted in one ``UserWarning``. A file that still fails to decode later, in ``__getitem__``, is replaced
by the next readable image with a ``UserWarning``; such late failures are counted in ``dataset.late_failures``
of the process that saw them (a DataLoader worker's count stays in the worker). A folder with no readable
image raises ``FileNotFoundError``.

Nothing is downloaded unless ``download=True``; a missing dataset raises ``FileNotFoundError`` saying
where it looked.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = [
    "DATASET_NAMES",
    "IMAGE_EXTENSIONS",
    "DigitsDataset",
    "ImageFolderDataset",
    "ImageTransform",
    "TorchvisionImages",
    "make_dataloader",
    "make_image_dataset",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
DATASET_NAMES: tuple[str, ...] = ("digits", "flowers102", "pets", "folder")
_DEFAULT_SIZE = {"digits": 8, "flowers102": 64, "pets": 64, "folder": 64}


class ImageTransform:
    """PIL image -> float32 tensor ``(channels, size, size)`` in ``[-1, 1]``: square centre crop, bicubic
    resize, optional random left-right flip, ``u8 / 127.5 - 1``. Picklable (DataLoader workers)."""

    def __init__(self, image_size: int, channels: int = 3, random_flip: bool = True) -> None:
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels!r}")
        self.image_size = image_size
        self.channels = channels
        self.random_flip = random_flip

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB" if self.channels == 3 else "L")
        w, h = image.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        image = image.crop((left, top, left + side, top + side))
        if side != self.image_size:
            image = image.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        arr = np.asarray(image, dtype=np.uint8).reshape(self.image_size, self.image_size, self.channels)
        x = torch.from_numpy(arr.copy()).permute(2, 0, 1).to(torch.float32) / 127.5 - 1.0
        if self.random_flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x

    def __repr__(self) -> str:
        return (f"ImageTransform(image_size={self.image_size}, channels={self.channels}, "
                f"random_flip={self.random_flip})")


class DigitsDataset(Dataset):
    """scikit-learn's 8x8 digits as ``(1, S, S)`` float32 tensors in ``[-1, 1]`` (``v / 8 - 1``).

    The images are resized once (bilinear, antialiased when shrinking) when ``image_size != 8``.
    """

    def __init__(self, image_size: int = 8, random_flip: bool = False) -> None:
        from sklearn.datasets import load_digits

        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        raw = load_digits().images  # (1797, 8, 8) float64, integer values 0..16
        x = torch.from_numpy(raw).to(torch.float32).unsqueeze(1) / 8.0 - 1.0
        if image_size != 8:
            x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False,
                              antialias=image_size < 8)
        self.images = x.contiguous()
        self.random_flip = random_flip

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        x = self.images[index]
        if self.random_flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x


class ImageFolderDataset(Dataset):
    """Every image under ``root`` (recursive), transformed by ``ImageTransform``; see the module docstring
    for how unreadable files are skipped and counted."""

    def __init__(
        self,
        root: str | Path,
        image_size: int = 64,
        channels: int = 3,
        random_flip: bool = True,
        full_check: bool = False,
    ) -> None:
        root = Path(root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"image folder root={str(root)!r} does not exist or is not a directory")
        self.root = root
        self.transform = ImageTransform(image_size, channels, random_flip)
        candidates = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        self.files: list[Path] = []
        self.skipped: list[tuple[Path, str]] = []
        for path in candidates:
            try:
                with Image.open(path) as im:
                    if full_check:
                        im.load()
                    else:
                        im.verify()
            except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
                self.skipped.append((path, f"{type(exc).__name__}: {exc}"))
            else:
                self.files.append(path)
        self.late_failures = 0
        if self.skipped:
            shown = ", ".join(str(p) for p, _ in self.skipped[:3])
            more = "" if len(self.skipped) <= 3 else f" and {len(self.skipped) - 3} more"
            warnings.warn(
                f"skipped {len(self.skipped)} unreadable image file(s) under {root}: {shown}{more}",
                UserWarning, stacklevel=2,
            )
        if not self.files:
            raise FileNotFoundError(
                f"no readable image found under {root} (searched recursively for {', '.join(IMAGE_EXTENSIONS)}; "
                f"{len(self.skipped)} unreadable)"
            )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        for k in range(len(self.files)):
            path = self.files[(index + k) % len(self.files)]
            try:
                with Image.open(path) as im:
                    return self.transform(im)
            except Exception as exc:
                self.late_failures += 1
                warnings.warn(f"could not decode {path} ({type(exc).__name__}: {exc}); using the next image",
                              UserWarning, stacklevel=2)
        raise RuntimeError(f"no image under {self.root} could be decoded")


class TorchvisionImages(Dataset):
    """Images of several torchvision datasets (e.g. all splits of one), labels dropped, transformed."""

    def __init__(self, parts: Sequence[Dataset], transform: ImageTransform) -> None:
        self.parts = list(parts)
        self.transform = transform
        self._offsets = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, index: int) -> torch.Tensor:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        part = int(np.searchsorted(self._offsets, index, side="right")) - 1
        image = self.parts[part][index - int(self._offsets[part])][0]
        return self.transform(image)


def _missing(paths: Sequence[Path]) -> list[Path]:
    return [p for p in paths if not p.exists()]


def _not_found(dataset: str, root: Path, base: Path, missing: Sequence[Path]) -> FileNotFoundError:
    return FileNotFoundError(
        f"{dataset} not found under root={str(root)!r}: looked in {base} and could not find "
        f"{', '.join(str(m) for m in missing)}. Pass --download (download=True) to fetch it there, "
        f"or --data-root (root=...) pointing at the folder that contains {base.name}/."
    )


def _flowers102(root: Path, transform: ImageTransform, download: bool) -> TorchvisionImages:
    from torchvision.datasets import Flowers102

    base = root / "flowers-102"
    needed = [base / "jpg", base / "imagelabels.mat", base / "setid.mat"]
    if not download and _missing(needed):
        raise _not_found("Flowers102", root, base, _missing(needed))
    try:
        parts = [Flowers102(str(root), split=s, download=download) for s in ("train", "val", "test")]
    except RuntimeError as exc:  # torchvision's "not found or corrupted" (an md5 mismatch here)
        raise FileNotFoundError(f"Flowers102 under {base} is incomplete or corrupted ({exc}); "
                                "delete it and pass --download") from exc
    return TorchvisionImages(parts, transform)


def _pets(root: Path, transform: ImageTransform, download: bool) -> TorchvisionImages:
    from torchvision.datasets import OxfordIIITPet

    base = root / "oxford-iiit-pet"
    needed = [base / "images", base / "annotations"]
    if not download and _missing(needed):
        raise _not_found("OxfordIIITPet", root, base, _missing(needed))
    try:
        # target_types=[] makes torchvision return (image, None): no label or mask is read.
        parts = [OxfordIIITPet(str(root), split=s, target_types=[], download=download) for s in ("trainval", "test")]
    except RuntimeError as exc:
        raise FileNotFoundError(f"OxfordIIITPet under {base} is incomplete ({exc}); pass --download") from exc
    return TorchvisionImages(parts, transform)


def make_image_dataset(
    name: str,
    root: str | Path | None = None,
    image_size: int | None = None,
    download: bool = False,
    *,
    channels: int | None = None,
    random_flip: bool | None = None,
    full_check: bool = False,
) -> Dataset:
    """Build an image dataset by name: ``"digits"``, ``"flowers102"``, ``"pets"`` or ``"folder"``.

    Items are float32 ``(C, image_size, image_size)`` tensors in ``[-1, 1]``, no labels.
    Defaults: ``image_size`` 8 for digits and 64 otherwise; ``channels`` 1 for digits (fixed) and 3 otherwise;
    ``random_flip`` False for digits and True otherwise. ``root`` is required except for digits;
    ``download`` only applies to flowers102 and pets. ``full_check`` (folder only) decodes every image at
    construction to find unreadable ones.
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown image dataset name={name!r}; known: {list(DATASET_NAMES)}")
    size = _DEFAULT_SIZE[name] if image_size is None else image_size
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if name == "digits":
        if channels not in (None, 1):
            raise ValueError(f"the digits dataset has 1 channel, got channels={channels}")
        return DigitsDataset(size, random_flip=bool(random_flip))
    if root is None:
        raise ValueError(f"root is required for the {name!r} dataset (CLI: --data-root)")
    root = Path(root).expanduser()
    ch = 3 if channels is None else channels
    flip = True if random_flip is None else random_flip
    if name == "folder":
        return ImageFolderDataset(root, size, ch, flip, full_check=full_check)
    transform = ImageTransform(size, ch, flip)
    if name == "flowers102":
        return _flowers102(root, transform, download)
    return _pets(root, transform, download)


def make_dataloader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = True,
    num_workers: int = 0,
    pin_memory: bool = False,
    sampler: Sampler | None = None,
    drop_last: bool = True,
) -> DataLoader:
    """A ``DataLoader`` of image batches ``(B, C, S, S)``.

    With a ``sampler`` (e.g. ``DistributedSampler``) the sampler does the shuffling and ``shuffle`` is ignored.
    Workers stay alive between epochs. Refuses a ``batch_size`` that would give no batch with ``drop_last``.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
    if drop_last and len(dataset) < batch_size:
        raise ValueError(f"batch_size={batch_size} exceeds the dataset size {len(dataset)} with drop_last=True "
                         "(no batch would ever be produced)")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
    )
