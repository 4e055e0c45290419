"""Image-encryption metrics: entropy, adjacent-pixel correlation, NPCR/UACI, PSNR, SSIM.

All functions take numpy arrays of symbols (uint8 pixels, or paper mode's 9-bit ciphertext
values stored in uint16) and return plain floats.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.ndimage import gaussian_filter

__all__ = ["entropy", "correlations", "npcr_uaci", "psnr", "ssim", "planes"]


def planes(frame: np.ndarray, height: int) -> list[np.ndarray]:
    """Split a frame in vidcrypt's layouts into 2-D planes of full resolution.

    ``(h, w, 3)`` gives three channels, ``(3, h, w)`` three planes, ``(1.5 h, w)`` (yuv420p)
    its luma plane, ``(h, w)`` itself.
    """
    if frame.ndim == 3 and frame.shape[-1] == 3:
        return [frame[..., c] for c in range(3)]
    if frame.ndim == 3:
        return list(frame)
    return [frame[:height]]


def entropy(values: np.ndarray | Sequence[np.ndarray], levels: int = 256) -> float:
    """Shannon entropy (bits per symbol) of the histogram of ``values`` over ``levels`` bins."""
    arrays = [values] if isinstance(values, np.ndarray) else list(values)
    hist = np.zeros(levels, dtype=np.int64)
    for arr in arrays:
        hist += np.bincount(arr.ravel().astype(np.int64), minlength=levels)[:levels]
    p = hist[hist > 0] / hist.sum()
    return float(-(p * np.log2(p)).sum())


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    x = x.astype(np.float64).ravel()
    y = y.astype(np.float64).ravel()
    sx, sy = x.std(), y.std()
    if sx == 0 or sy == 0:
        return 0.0
    return float(((x - x.mean()) * (y - y.mean())).mean() / (sx * sy))


def correlations(images: Sequence[np.ndarray]) -> dict[str, float]:
    """Correlation coefficient of horizontally, vertically and diagonally adjacent pixels.

    All adjacent pairs of all given 2-D ``images`` are pooled.
    """
    pairs = {
        "horizontal": (np.s_[:, :-1], np.s_[:, 1:]),
        "vertical": (np.s_[:-1, :], np.s_[1:, :]),
        "diagonal": (np.s_[:-1, :-1], np.s_[1:, 1:]),
    }
    out = {}
    for name, (a, b) in pairs.items():
        xs = np.concatenate([img[a].ravel() for img in images])
        ys = np.concatenate([img[b].ravel() for img in images])
        out[name] = _pearson(xs, ys)
    return out


def npcr_uaci(c1: np.ndarray, c2: np.ndarray, max_value: int = 255) -> tuple[float, float]:
    """NPCR and UACI (percent) between two cipher images of equal shape.

    NPCR is the share of positions whose values differ; UACI the mean absolute difference
    relative to ``max_value``. Ideal values for 8-bit random images: 99.61 % and 33.46 %.
    """
    if c1.shape != c2.shape:
        raise ValueError(f"cipher images differ in shape: {c1.shape} vs {c2.shape}")
    a, b = c1.astype(np.int64), c2.astype(np.int64)
    npcr = float(np.mean(a != b) * 100)
    uaci = float(np.mean(np.abs(a - b)) / max_value * 100)
    return npcr, uaci


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB (``inf`` for identical inputs)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def ssim(a: np.ndarray, b: np.ndarray, peak: float = 255.0, sigma: float = 1.5) -> float:
    """Mean structural similarity (Wang et al. 2004, Gaussian window) of two 2-D images."""
    x, y = a.astype(np.float64), b.astype(np.float64)
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    mx, my = gaussian_filter(x, sigma), gaussian_filter(y, sigma)
    vx = gaussian_filter(x * x, sigma) - mx * mx
    vy = gaussian_filter(y * y, sigma) - my * my
    cxy = gaussian_filter(x * y, sigma) - mx * my
    num = (2 * mx * my + c1) * (2 * cxy + c2)
    den = (mx * mx + my * my + c1) * (vx + vy + c2)
    return float(np.mean(num / den))
