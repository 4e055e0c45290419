"""The analysis figure: original frame, encrypted frame and both histograms."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .metrics import planes

__all__ = ["save_figure"]


def _display(frame: np.ndarray, height: int, scale: float) -> tuple[np.ndarray, str | None]:
    if frame.ndim == 3 and frame.shape[-1] == 3:
        return np.clip(frame.astype(np.float64) * scale, 0, 255).astype(np.uint8), None
    return planes(frame, height)[0].astype(np.float64) * scale, "gray"


def save_figure(
    path: str | Path,
    original: np.ndarray,
    encrypted: np.ndarray,
    levels: int,
    height: int,
    mode: str,
) -> Path:
    """Write a 2x2 PNG: frames on top (cipher values scaled to 0..255), histograms below.

    Colour frames are shown with their channels in stored order (bgr24 looks colour-swapped).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
    img, cmap = _display(original, height, 1.0)
    axes[0, 0].imshow(img, cmap=cmap, vmin=0, vmax=255)
    axes[0, 0].set_title("original frame")
    img, cmap = _display(encrypted, height, 255.0 / (levels - 1))
    axes[0, 1].imshow(img, cmap=cmap, vmin=0, vmax=255)
    axes[0, 1].set_title(f"encrypted frame ({mode}, {levels} levels scaled to 8 bit)")
    for ax in axes[0]:
        ax.axis("off")
    axes[1, 0].bar(np.arange(256), np.bincount(original.ravel(), minlength=256), width=1.0)
    axes[1, 0].set_title("original histogram")
    hist = np.bincount(encrypted.ravel().astype(np.int64), minlength=levels)
    axes[1, 1].bar(np.arange(hist.size), hist, width=1.0, color="tab:red")
    axes[1, 1].set_title("encrypted histogram")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out
