"""Sentinel-2 time-series tiles as a torch Dataset (synthetic or real, same pipeline).

A data set is a folder of ``.npz`` stacks, one per tile, with keys:

- ``images`` (T, C, H, W) float reflectance, ``doy`` (T,) day of year (0..365),
- ``labels`` (H, W) integer class ids, optionally ``mask`` (H, W) bool (False = unlabelled).

Each item is standardised per band, ``x' = (x - mean_c) / std_c``, with statistics computed over
every pixel and date of a *training* folder (:meth:`BandStats.from_folder`) and passed unchanged
to the validation and test sets. Labels go through an optional ``label_map`` (e.g.
:data:`studies.wheat.s2synth.WHEAT_VS_OTHER`); unlabelled pixels (``mask`` False or negative
labels) become ``ignore_index``. Training items are flipped horizontally and/or vertically with
probability 1/2 each, drawn from ``(seed, epoch, index)``: the same epoch gives the same flips
whatever the worker order. Items of one batch must share T (synthetic monthly stacks all have
T = 9).

Real multi-date GeoTIFFs enter through :func:`geotiff_to_npz` (needs ``rasterio``), which cuts
them into tiles of the same format.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from slimtune.io import atomic_write, atomic_write_text

__all__ = ["BandStats", "S2TileDataset", "load_geotiff_stack", "geotiff_to_npz"]


@dataclass(frozen=True)
class BandStats:
    """Per-band mean and standard deviation."""

    mean: tuple[float, ...]
    """Mean of each band."""
    std: tuple[float, ...]
    """Standard deviation of each band (> 0)."""

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError(f"mean and std need one value per band, got {self.mean}, {self.std}")
        if any(not s > 0 for s in self.std):
            raise ValueError(f"band standard deviations must be > 0, got {self.std}")

    @classmethod
    def from_folder(cls, root: str | os.PathLike[str]) -> BandStats:
        """Statistics over every pixel and date of the ``.npz`` stacks in ``root`` (float64)."""
        total = sq = None
        count = 0
        for path in _files(root):
            with np.load(path) as z:
                img = z["images"].astype(np.float64)
            s, s2 = img.sum(axis=(0, 2, 3)), (img**2).sum(axis=(0, 2, 3))
            total = s if total is None else total + s
            sq = s2 if sq is None else sq + s2
            count += img.shape[0] * img.shape[2] * img.shape[3]
        if total is None or sq is None or count == 0:
            raise ValueError(f"no pixels to compute band statistics from in {str(root)!r}")
        mean = total / count
        std = np.sqrt(np.maximum(sq / count - mean**2, 1e-12))
        return cls(tuple(float(m) for m in mean), tuple(float(s) for s in std))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the statistics as JSON (atomically)."""
        atomic_write_text(
            path, json.dumps({"mean": list(self.mean), "std": list(self.std)}, indent=2)
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> BandStats:
        """Read statistics written by :meth:`save`."""
        d = json.loads(Path(path).read_text())
        return cls(tuple(d["mean"]), tuple(d["std"]))


def _files(root: str | os.PathLike[str]) -> list[Path]:
    files = sorted(Path(root).glob("*.npz"))
    if not files:
        raise FileNotFoundError(f"no .npz stacks in {str(root)!r}")
    return files


class S2TileDataset(Dataset):
    """Folder of ``.npz`` tiles -> dicts ``x`` (T,C,H,W) float32, ``doy`` (T,), ``y`` (H,W) int64.

    Args:
        root: folder of ``.npz`` stacks.
        stats: band statistics; ``None`` computes them from ``root`` (do this for training only
            and pass ``train_set.stats`` to the other splits).
        train: apply random flips.
        label_map: class id -> new id (every labelled class present must be mapped).
        ignore_index: label given to unlabelled pixels.
        seed: seed of the flips.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        stats: BandStats | None = None,
        train: bool = False,
        label_map: Mapping[int, int] | None = None,
        ignore_index: int = -1,
        seed: int = 0,
    ) -> None:
        self.files = _files(root)
        self.stats = stats if stats is not None else BandStats.from_folder(root)
        self.train = train
        self.label_map = dict(label_map) if label_map is not None else None
        self.ignore_index = ignore_index
        self.seed = seed
        self.epoch = 0
        self._mean = np.asarray(self.stats.mean, np.float32)[:, None, None]
        self._std = np.asarray(self.stats.std, np.float32)[:, None, None]

    def set_epoch(self, epoch: int) -> None:
        """Choose the flips of an epoch (call before each epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.files)

    def _labels(self, labels: np.ndarray, mask: np.ndarray | None, path: Path) -> np.ndarray:
        y = labels.astype(np.int64)
        unlabelled = y < 0 if mask is None else (y < 0) | ~mask.astype(bool)
        if self.label_map is not None:
            present = np.unique(y[~unlabelled])
            missing = [int(c) for c in present if int(c) not in self.label_map]
            if missing:
                raise ValueError(
                    f"label_map has no entry for classes {missing} found in {path.name}; "
                    f"mapped: {sorted(self.label_map)}"
                )
            mapped = np.full_like(y, self.ignore_index)
            for c in present:
                mapped[(y == c) & ~unlabelled] = self.label_map[int(c)]
            y = mapped
        return np.where(unlabelled, self.ignore_index, y)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        path = self.files[index]
        with np.load(path) as z:
            img = z["images"].astype(np.float32)
            doy = z["doy"].astype(np.int64)
            mask = z["mask"] if "mask" in z.files else None
            y = self._labels(z["labels"], mask, path)
        if img.ndim != 4 or img.shape[1] != self._mean.shape[0] or img.shape[2:] != y.shape:
            raise ValueError(
                f"{path.name}: images must be (T, {self._mean.shape[0]}, H, W) matching labels "
                f"(H, W), got {img.shape} and {y.shape}"
            )
        if doy.shape != (img.shape[0],) or doy.min() < 0 or doy.max() > 365:
            raise ValueError(f"{path.name}: doy must be T={img.shape[0]} days in 0..365, got {doy}")
        x = (img - self._mean) / self._std
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            if rng.random() < 0.5:
                x, y = x[..., ::-1], y[..., ::-1]
            if rng.random() < 0.5:
                x, y = x[..., ::-1, :], y[..., ::-1, :]
        return {
            "x": torch.from_numpy(np.ascontiguousarray(x)),
            "doy": torch.from_numpy(doy),
            "y": torch.from_numpy(np.ascontiguousarray(y)),
        }


def _savez(tmp: str, arrays: dict[str, np.ndarray]) -> None:
    with open(tmp, "wb") as fh:  # a file object: numpy would append ".npz" to a path
        np.savez_compressed(fh, **arrays)  # type: ignore[arg-type]


def _rasterio():  # type: ignore[no-untyped-def]
    try:
        import rasterio  # type: ignore[import-not-found]
    except ImportError as exc:
        raise ImportError(
            "reading GeoTIFFs needs rasterio, which is not installed: pip install rasterio"
        ) from exc
    return rasterio


def load_geotiff_stack(
    image_paths: Sequence[str | os.PathLike[str]],
    doy: Sequence[int],
    labels_path: str | os.PathLike[str] | None = None,
    *,
    scale: float = 1e-4,
) -> dict[str, np.ndarray]:
    """Read one multi-band GeoTIFF per date (same grid) and an optional label raster.

    Args:
        image_paths: one file per date, each with the C bands in :data:`s2synth.BANDS` order.
        doy: day of year of each date (0..365).
        labels_path: single-band raster of class ids (nodata / negative = unlabelled).
        scale: multiplier from digital numbers to reflectance (1e-4 for L2A).

    Returns:
        ``images`` (T, C, H, W) float32, ``doy`` (T,), and ``labels`` / ``mask`` if given.
    """
    rio = _rasterio()
    if len(image_paths) != len(doy):
        raise ValueError(f"got {len(image_paths)} images but {len(doy)} days of year")
    frames = []
    for p in image_paths:
        with rio.open(p) as src:
            frames.append(src.read().astype(np.float32) * scale)
    shapes = {f.shape for f in frames}
    if len(shapes) != 1:
        raise ValueError(f"all dates must share one grid (C, H, W), got {sorted(shapes)}")
    out = {"images": np.stack(frames), "doy": np.asarray(doy, np.int64)}
    if labels_path is not None:
        with rio.open(labels_path) as src:
            lab = src.read(1, masked=True)
        out["labels"] = np.asarray(lab.filled(-1), np.int64)
        out["mask"] = ~np.ma.getmaskarray(lab) & (out["labels"] >= 0)
    return out


def geotiff_to_npz(
    image_paths: Sequence[str | os.PathLike[str]],
    doy: Sequence[int],
    out_dir: str | os.PathLike[str],
    labels_path: str | os.PathLike[str] | None = None,
    *,
    tile: int = 24,
    scale: float = 1e-4,
) -> list[Path]:
    """Cut GeoTIFF stacks into ``tile`` x ``tile`` ``.npz`` tiles readable by the dataset."""
    stack = load_geotiff_stack(image_paths, doy, labels_path, scale=scale)
    _, _, h, w = stack["images"].shape
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(0, h - tile + 1, tile):
        for j in range(0, w - tile + 1, tile):
            part = {
                k: v[..., i : i + tile, j : j + tile] if v.ndim >= 2 else v
                for k, v in stack.items()
            }
            if "labels" not in part:
                part["labels"] = np.full((tile, tile), -1, np.int64)
            path = out / f"tile_r{i:05d}_c{j:05d}.npz"
            atomic_write(path, functools.partial(_savez, arrays=part))
            paths.append(path)
    return paths
