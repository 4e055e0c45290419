"""Generated dSprites-like tasks (VTAB's "structured" group): count, position, orientation.

Each 64x64 grayscale image holds white-ish shapes (square, ellipse, triangle) on black with a
little Gaussian noise. Image ``i`` of a split is drawn from its own generator seeded with
``(task, split, i)``, so a split is the same on every machine and every call, and the test
split never overlaps the training split's random streams.

====================  =======  ===========================================================
task                  classes  label
====================  =======  ===========================================================
``shapes-count``      6        number of objects minus one (1..6 non-overlapping shapes)
``shapes-position``   8        horizontal bin of one shape's centre (8 equal bins)
``shapes-orientation``6        orientation of one elongated shape, 30-degree bins of [0, 180)
====================  =======  ===========================================================

Labels are drawn uniformly, so classes are balanced in expectation.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Any

import numpy as np

from .base import TaskData
from .images import image_task

__all__ = ["SIZE", "TRAIN_SIZE", "TEST_SIZE", "STRUCTURED_TASKS", "render", "generate"]

SIZE = 64
TRAIN_SIZE = 2000
TEST_SIZE = 1000
N_COUNT, N_POSITION, N_ORIENTATION = 6, 8, 6
_SPLITS = {"train": 0, "test": 1}
_TASK_IDS = {"shapes-count": 11, "shapes-position": 12, "shapes-orientation": 13}
_SHAPES = ("square", "ellipse", "triangle")
_GRID_Y, _GRID_X = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5


def render(
    canvas: np.ndarray, kind: str, cx: float, cy: float, r: float, angle: float, aspect: float = 1
) -> None:
    """Draw one filled shape of radius ``r`` (half-length ``r * aspect`` along ``angle``).

    Args:
        canvas: (SIZE, SIZE) float array; the shape's pixels are set to 1.
        kind: ``"square"``, ``"ellipse"`` or ``"triangle"``.
        cx, cy: centre in pixels; angle: rotation in radians; aspect: elongation.
    """
    reach = r * max(aspect, 1.0) + 1.0
    y0, y1 = max(int(cy - reach), 0), min(int(cy + reach) + 2, SIZE)
    x0, x1 = max(int(cx - reach), 0), min(int(cx + reach) + 2, SIZE)
    dx, dy = _GRID_X[y0:y1, x0:x1] - cx, _GRID_Y[y0:y1, x0:x1] - cy
    u = dx * np.cos(angle) + dy * np.sin(angle)  # along the shape's main axis
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    if kind == "square":
        mask = (np.abs(u) <= r * aspect) & (np.abs(v) <= r)
    elif kind == "ellipse":
        mask = (u / (r * aspect)) ** 2 + (v / r) ** 2 <= 1.0
    elif kind == "triangle":  # apex along +u, base at u = -r/2
        mask = (u >= -r / 2) & (np.abs(v) <= (r - u) / np.sqrt(3.0))
    else:
        raise ValueError(f"unknown shape {kind!r}: use square, ellipse or triangle")
    canvas[y0:y1, x0:x1][mask] = 1.0


def _finish(canvas: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    canvas *= rng.uniform(0.6, 1.0)
    canvas += rng.standard_normal(canvas.shape, dtype=np.float32) * 0.03
    return np.clip(np.rint(canvas * 255.0), 0, 255).astype(np.uint8)


def _count(rng: np.random.Generator) -> tuple[np.ndarray, int]:
    label = int(rng.integers(N_COUNT))
    canvas = np.zeros((SIZE, SIZE), np.float32)
    placed: list[tuple[float, float, float]] = []
    while len(placed) < label + 1:  # always succeeds: six radius-6 shapes fit easily
        r = float(rng.uniform(3.0, 6.0))
        cx, cy = rng.uniform(r + 1, SIZE - r - 1, size=2)
        if all(np.hypot(cx - x, cy - y) > 1.5 * (r + q) + 1 for x, y, q in placed):
            kind = _SHAPES[int(rng.integers(3))]
            render(canvas, kind, cx, cy, r, float(rng.uniform(0, 2 * np.pi)))
            placed.append((cx, cy, r))
    return _finish(canvas, rng), label


def _position(rng: np.random.Generator) -> tuple[np.ndarray, int]:
    label = int(rng.integers(N_POSITION))
    r = float(rng.uniform(4.0, 7.0))
    lo, hi = 8.0, SIZE - 8.0  # shape centres stay inside [lo, hi)
    width = (hi - lo) / N_POSITION
    cx = rng.uniform(lo + label * width, lo + (label + 1) * width)
    cy = rng.uniform(8.0, SIZE - 8.0)
    canvas = np.zeros((SIZE, SIZE), np.float32)
    kind = _SHAPES[int(rng.integers(3))]
    render(canvas, kind, cx, cy, r, float(rng.uniform(0, 2 * np.pi)))
    return _finish(canvas, rng), label


def _orientation(rng: np.random.Generator) -> tuple[np.ndarray, int]:
    label = int(rng.integers(N_ORIENTATION))
    angle = rng.uniform(label, label + 1) * np.pi / N_ORIENTATION
    r = float(rng.uniform(4.0, 6.0))
    cx, cy = rng.uniform(24.0, 40.0, size=2)
    canvas = np.zeros((SIZE, SIZE), np.float32)
    kind = _SHAPES[int(rng.integers(2))]  # symmetric under a half turn
    render(canvas, kind, cx, cy, r, float(angle), aspect=float(rng.uniform(2.5, 3.5)))
    return _finish(canvas, rng), label


_GENERATORS: dict[str, tuple[Callable[[np.random.Generator], tuple[np.ndarray, int]], int]] = {
    "shapes-count": (_count, N_COUNT),
    "shapes-position": (_position, N_POSITION),
    "shapes-orientation": (_orientation, N_ORIENTATION),
}


@lru_cache(maxsize=8)
def generate(task: str, split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` (images (n, 64, 64) uint8, labels (n,)) of a generated split.

    Raises:
        ValueError: unknown task or split.
    """
    if task not in _GENERATORS:
        raise ValueError(f"unknown structured task {task!r}: use one of {list(_GENERATORS)}")
    if split not in _SPLITS:
        raise ValueError(f"unknown split {split!r}: use 'train' or 'test'")
    draw = _GENERATORS[task][0]
    images = np.empty((n, SIZE, SIZE), np.uint8)
    labels = np.empty(n, np.int64)
    for i in range(n):
        rng = np.random.default_rng([_TASK_IDS[task], _SPLITS[split], i])
        images[i], labels[i] = draw(rng)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def _class_names(task: str) -> tuple[str, ...]:
    if task == "shapes-count":
        return tuple(f"{k} object{'s' if k > 1 else ''}" for k in range(1, N_COUNT + 1))
    if task == "shapes-position":
        return tuple(f"x-bin {k}" for k in range(N_POSITION))
    step = 180 // N_ORIENTATION
    return tuple(f"{k * step}-{(k + 1) * step} deg" for k in range(N_ORIENTATION))


def _loader(task: str) -> Callable[..., TaskData]:
    def load(*, n_train: int, n_val: int, **kwargs: Any) -> TaskData:
        train = generate(task, "train", max(TRAIN_SIZE, n_train + n_val))
        test = generate(task, "test", TEST_SIZE)
        names = _class_names(task)
        return image_task(task, names, train, test, n_train=n_train, n_val=n_val, **kwargs)

    load.__doc__ = f"Generated task {task!r}: {TRAIN_SIZE} training / {TEST_SIZE} test images."
    return load


STRUCTURED_TASKS: dict[str, Callable[..., TaskData]] = {t: _loader(t) for t in _GENERATORS}
"""Task name -> loader taking the keyword arguments of ``image_task`` (minus the arrays)."""
