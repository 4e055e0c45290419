"""What every task shares: the :class:`TaskData` record, the VTAB-1k split, data locations.

VTAB-1k protocol, applied to every task (images and text)::

    official training split ──seeded permutation(seed)──> [ n_train | n_val | unused ... ]
    official test split ─────(n_test: fixed-seed subset)─> test

Tasks that ship a single split get a fixed train/test split first (seed ``SPLIT_SEED``,
independent of ``seed``), so the test set is the same for every run and only the 800/200
selection moves with ``seed``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from ...errors import SlimtuneError

__all__ = [
    "TaskData",
    "DataSourceError",
    "SPLIT_SEED",
    "TEST_SUBSET_SEED",
    "data_root",
    "vtab_indices",
    "capped_indices",
    "holdout_split",
]

SPLIT_SEED = 20240601
"""Seed of the fixed train/test split of tasks that ship a single split."""
TEST_SUBSET_SEED = 1234
"""Seed of the ``n_test`` subset of a test split (fixed so every run sees the same images)."""


class DataSourceError(SlimtuneError, FileNotFoundError):
    """A data source is not installed; the message names the command that provides it."""


@dataclass
class TaskData:
    """A classification task split VTAB-1k style, ready for a ``DataLoader``.

    Example:
        >>> task = load_task("digits")  # doctest: +SKIP
        >>> loader = DataLoader(task.train, batch_size=32, collate_fn=task.collate)
    """

    name: str
    """Registry name of the task."""
    kind: str
    """``"image"`` (items ``pixel_values``, ``labels``) or ``"text"`` (``input_ids``, ``labels``)."""
    num_classes: int
    """Number of classes; labels are ``0 .. num_classes - 1``."""
    class_names: tuple[str, ...]
    """Human-readable name of each label."""
    train: Dataset
    """``n_train`` examples picked with ``seed`` from the training split."""
    val: Dataset
    """``n_val`` further examples from the training split (disjoint from ``train``)."""
    test: Dataset
    """The official test split (or a fixed-seed subset of ``n_test`` examples)."""
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]]
    """Batches a list of items into a dict of tensors (``collate_fn`` of a ``DataLoader``)."""


def data_root() -> Path:
    """Folder of the non-PyPI data: ``$SLIMTUNE_DATA`` or ``~/.cache/slimtune/data``."""
    root = os.environ.get("SLIMTUNE_DATA")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "slimtune" / "data"


def vtab_indices(
    labels: Sequence[int] | np.ndarray, n_train: int, n_val: int, seed: int, *, task: str = ""
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of ``n_train`` training and ``n_val`` validation examples of a training split.

    Raises:
        ValueError: the split has fewer than ``n_train + n_val`` examples, or a count is < 0.
    """
    n = len(labels)
    if n_train < 0 or n_val < 0:
        raise ValueError(f"{task}: n_train and n_val must be >= 0, got {n_train}, {n_val}")
    if n_train + n_val > n:
        raise ValueError(
            f"{task}: n_train + n_val = {n_train + n_val} exceeds the {n} examples "
            "of its training split"
        )
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[:n_train]), np.sort(order[n_train : n_train + n_val])


def capped_indices(n: int, n_test: int | None) -> np.ndarray:
    """All ``n`` test indices, or a fixed-seed subset of ``n_test`` of them (sorted)."""
    if n_test is None or n_test >= n:
        return np.arange(n)
    if n_test < 0:
        raise ValueError(f"n_test must be >= 0 or None, got {n_test}")
    order = np.random.default_rng(TEST_SUBSET_SEED).permutation(n)
    return np.sort(order[:n_test])


def holdout_split(labels: np.ndarray, n_test: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed, stratified (pool, test) split of a single-split data set (seed ``SPLIT_SEED``).

    Each class contributes to the test set in proportion to its size.
    """
    rng = np.random.default_rng(SPLIT_SEED)
    labels = np.asarray(labels)
    test: list[np.ndarray] = []
    classes, counts = np.unique(labels, return_counts=True)
    quotas = np.floor(counts * n_test / len(labels)).astype(int)
    quotas[: n_test - quotas.sum()] += 1  # hand out the remainder
    for cls, quota in zip(classes, quotas, strict=True):
        members = np.flatnonzero(labels == cls)
        test.append(rng.choice(members, size=quota, replace=False))
    test_idx = np.sort(np.concatenate(test))
    pool_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    return pool_idx, test_idx
