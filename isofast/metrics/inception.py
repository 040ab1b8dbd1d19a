"""The Inception-v3 network of the FID, compatible with ``pt_inception-2015-12-05-6726825d.pth``.

That file is the TensorFlow graph ``inception-2015-12-05`` (the network of the original FID and Inception Score
code) ported to PyTorch by pytorch-fid. Its architecture is torchvision's ``Inception3`` (1008 classes, no
auxiliary head) with three differences, reproduced here on torchvision's building blocks:

* in ``Mixed_5b..5d`` (InceptionA), ``Mixed_6b..6e`` (InceptionC) and ``Mixed_7b`` (InceptionE), the pooling
  branch's 3x3 average pool ignores the zero padding (TensorFlow's ``count_include_pad=False``);
* in ``Mixed_7c`` (the last InceptionE) that pool is a 3x3 *max* pool;
* there is no input transform (torchvision's ``transform_input`` is off): the network expects ``[-1, 1]``.

Features (``FIDInceptionV3.forward``):
  * ``pool``  (B, 2048) float32: the global average pool after ``Mixed_7c`` — the FID features ("pool_3");
  * ``logits`` (B, 1008) float32: ``pool @ fc.weight.T`` *without* the bias, as the original Inception Score
    code (``softmax/logits/MatMul`` of the TF graph) and torch-fidelity's ``logits_unbiased`` compute them.

Inputs: float images (B, 3, H, W) in ``[-1, 1]`` (``input_range="[-1,1]"``, the default, which is what isofast's
models produce) or in ``[0, 1]`` (``input_range="[0,1]"``, pytorch-fid's convention); uint8 images in ``0..255``
are accepted whatever the setting. One-channel images are repeated to three. Images are resized to 299x299 with
``F.interpolate(mode="bilinear", align_corners=False)`` (pytorch-fid's resize; torch-fidelity instead mimics
TensorFlow's resize, so its FID differs slightly), then mapped to ``[-1, 1]``.

The weights are never downloaded: ``load_inception(path)`` reads a local file.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.inception import BasicConv2d, InceptionA, InceptionB, InceptionC, InceptionD, InceptionE

__all__ = [
    "FID_WEIGHTS_FILENAME",
    "FID_WEIGHTS_URL",
    "INCEPTION_WEIGHTS_ENV",
    "FIDInceptionV3",
    "load_inception",
]

FID_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS_FILENAME}"
INCEPTION_WEIGHTS_ENV = "ISOFAST_INCEPTION_WEIGHTS"
_SHA256_PREFIX = "6726825d"  # torch.hub convention: the file name carries the first 8 hex digits of its sha256
_INPUT_RANGES = ("[-1,1]", "[0,1]")


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow's SAME-padded average pool divides by the number of real (unpadded) pixels in the window.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _tf_max_pool(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


class FIDInceptionA(InceptionA):
    """torchvision's InceptionA whose pooling branch averages over unpadded pixels only."""

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_tf_avg_pool(x)),
        ]


class FIDInceptionC(InceptionC):
    """torchvision's InceptionC whose pooling branch averages over unpadded pixels only."""

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7dbl = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                     self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7dbl = conv(b7dbl)
        return [self.branch1x1(x), b7, b7dbl, self.branch_pool(_tf_avg_pool(x))]


class FIDInceptionE(InceptionE):
    """torchvision's InceptionE with the FID graph's pooling branch: ``pool="avg"`` (unpadded average,
    Mixed_7b) or ``pool="max"`` (Mixed_7c)."""

    def __init__(self, in_channels: int, pool: str) -> None:
        super().__init__(in_channels)
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = _tf_avg_pool(x) if self.pool == "avg" else _tf_max_pool(x)
        return [self.branch1x1(x), b3, bd, self.branch_pool(pooled)]


class FIDInceptionV3(nn.Module):
    """FID Inception-v3: ``forward(images (B,3|1,H,W)) -> (pool (B,2048), logits (B,1008))``, float32.

    Parameter names equal those of ``pt_inception-2015-12-05-6726825d.pth`` (torchvision's Inception3 names).
    See the module docstring for the input range and the resize.
    """

    def __init__(self, input_range: str = "[-1,1]") -> None:
        super().__init__()
        if input_range not in _INPUT_RANGES:
            raise ValueError(f"input_range must be one of {_INPUT_RANGES}, got {input_range!r}")
        self.input_range = input_range
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, pool="avg")
        self.Mixed_7c = FIDInceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3|1, H, W) images -> (B, 3, 299, 299) float32 in the network's range [-1, 1]."""
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must have shape (B, 3 or 1, H, W), got {tuple(images.shape)}")
        if images.dtype == torch.uint8:
            x, zero_one = images.to(torch.float32) / 255.0, True
        elif images.is_floating_point():
            x, zero_one = images.to(torch.float32), self.input_range == "[0,1]"
        else:
            raise TypeError(f"images must be a float or uint8 tensor, got {images.dtype}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return 2.0 * x - 1.0 if zero_one else x

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.preprocess(images)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        pool = x.mean(dim=(2, 3))
        logits = pool @ self.fc.weight.T
        return pool, logits


def _load_weights_only(file: Path):
    """``torch.load(file, weights_only=True)``, its failures as one ValueError naming the file.

    torch raises KeyError for a file that is not a PyTorch archive, and for a pickle that would run code an
    UnpicklingError whose text advises ``weights_only=False``: advice that must not reach a user.
    """
    import pickle
    import zipfile

    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc):  # the pickle names a function or class to call
            raise ValueError(f"{file} holds objects other than tensors (loading it would run code from the file): "
                             f"refused; expected {FID_WEIGHTS_FILENAME}") from None
        raise ValueError(f"{file} is not a PyTorch weights file (unreadable pickle); expected "
                         f"{FID_WEIGHTS_FILENAME}") from None
    except (KeyError, EOFError, RuntimeError, ValueError, zipfile.BadZipFile, OSError) as exc:
        raise ValueError(f"{file} is not a PyTorch weights file ({type(exc).__name__}); expected "
                         f"{FID_WEIGHTS_FILENAME}") from None


def _missing_weights_error(where: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"FID Inception weights not found ({where}). isofast never downloads them: fetch {FID_WEIGHTS_FILENAME} "
        f"from {FID_WEIGHTS_URL} and pass its path (load_inception(path), the CLI's --inception-weights, "
        f"or the environment variable {INCEPTION_WEIGHTS_ENV}=/path/to/{FID_WEIGHTS_FILENAME})."
    )


def load_inception(
    path: str | os.PathLike | None = None,
    *,
    device: str | torch.device = "cpu",
    input_range: str = "[-1,1]",
    check_hash: bool = False,
) -> FIDInceptionV3:
    """The FID Inception network with weights read from a local file, in eval mode, without gradients.

    path: the weights file; ``None`` -> the environment variable ``ISOFAST_INCEPTION_WEIGHTS``. Missing ->
    FileNotFoundError saying where to get ``pt_inception-2015-12-05-6726825d.pth``. The file's keys must be
    exactly the network's (``num_batches_tracked`` buffers may be absent). ``check_hash`` verifies that the
    file's sha256 starts with ``6726825d`` (the released file).
    """
    if path is None:
        env = os.environ.get(INCEPTION_WEIGHTS_ENV)
        if not env:
            raise _missing_weights_error(f"no path given and {INCEPTION_WEIGHTS_ENV} is not set")
        path, source = env, f"{INCEPTION_WEIGHTS_ENV}={env!r}"
    else:
        source = f"path={str(path)!r}"
    file = Path(path).expanduser()
    if not file.is_file():
        raise _missing_weights_error(f"{source} is not a file")
    if check_hash:
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        if not digest.startswith(_SHA256_PREFIX):
            raise ValueError(f"{file} has sha256 {digest[:16]}..., not the released {FID_WEIGHTS_FILENAME} "
                             f"(sha256 {_SHA256_PREFIX}...)")
    state = _load_weights_only(file)
    if not isinstance(state, dict):
        raise ValueError(f"{file} does not hold a state dict (got {type(state).__name__})")
    model = FIDInceptionV3(input_range=input_range)
    expected = model.state_dict()
    state = dict(state)
    for key, value in expected.items():
        # Files saved before BatchNorm had the counter lack it; it plays no part in eval mode.
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = value
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{file} is not an FID Inception state dict: missing keys {missing[:5]} "
                         f"({len(missing)}), unexpected keys {unexpected[:5]} ({len(unexpected)})")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # shape mismatches
        raise ValueError(f"{file} does not fit the FID Inception network: {exc}") from exc
    model.eval().requires_grad_(False)
    return model.to(device)
