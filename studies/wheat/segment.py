"""Semantic segmentation of time series (TSViT on Sentinel-2 tiles) on the application's loop.

Items are dicts ``x`` (T, C, H, W), ``doy`` (T,), ``y`` (H, W) with ``ignore_index`` on unlabelled
pixels (:class:`studies.wheat.s2.S2TileDataset`); the model maps ``(x, doy)`` to logits
(B, K, H, W). The loss is the per-pixel cross-entropy over labelled pixels only.

Training is :func:`slimtune.app.loop.fit` with :func:`segmentation_hooks` (the loss, the scores
and the selection): AdamW without decay on 1-D tensors, linear warm-up then cosine decay,
gradient clipping, validation after every epoch, the best epoch's trainable tensors restored at
the end, and an atomic checkpoint per epoch so a stopped run resumes (``resume=True``) where it
stopped. Model selection uses the validation F1 of class ``positive`` when one is given (binary
tasks), else pixel accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from slimtune.app.loop import LoopHooks, fit
from studies.wheat.segmetrics import Confusion, confusion, positive_probability

__all__ = [
    "SegTrainConfig",
    "evaluate_segmentation",
    "predict",
    "segmentation_hooks",
    "train_segmentation",
]


@dataclass
class SegTrainConfig:
    """Optimisation settings of a segmentation run."""

    epochs: int = 20
    """Passes over the training tiles."""
    batch_size: int = 32
    """Tiles per optimizer step."""
    eval_batch_size: int = 32
    """Tiles per evaluation batch."""
    lr: float = 1e-4
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW weight decay (never on biases, norms and other 1-D tensors)."""
    warmup: float = 0.1
    """Warm-up length as a fraction of all steps."""
    grad_clip: float = 1.0
    """Maximum gradient norm (0 = off)."""
    seed: int = 0
    """Seed of the tile order and of the flips."""

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"train.{name} must be a positive integer, got {v!r}")
        self.lr = float(self.lr)
        if not self.lr > 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr!r}")
        self.weight_decay = float(self.weight_decay)
        self.warmup = float(self.warmup)
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"train.warmup is a fraction in [0, 1), got {self.warmup!r}")
        self.grad_clip = float(self.grad_clip)
        if not isinstance(self.seed, int):
            raise ValueError(f"train.seed must be an integer, got {self.seed!r}")


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def predict(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits (B, K, H, W) of one batch, in eval mode (float32)."""
    dev = _device(model)
    was = model.training
    model.eval()
    try:
        return model(batch["x"].to(dev), batch["doy"].to(dev)).float()
    finally:
        model.train(was)


@torch.no_grad()
def evaluate_segmentation(
    model: nn.Module,
    data: Dataset,
    *,
    batch_size: int = 32,
    positive: int | None = 1,
    ignore_index: int = -1,
    threshold: float = 0.5,
) -> dict[str, float]:
    """Loss and pixel accuracy over labelled pixels; with ``positive``, that class's scores.

    Binary scores (F1, IoU, precision, recall) come from the softmax probability of class
    ``positive`` thresholded at ``threshold`` (see :mod:`studies.wheat.segmetrics`).
    """
    loss_sum, correct, n = 0.0, 0, 0
    conf = Confusion()
    for batch in DataLoader(data, batch_size=batch_size, shuffle=False):  # type: ignore[arg-type]
        logits = predict(model, batch)
        y = batch["y"].to(logits.device)
        keep = y != ignore_index
        loss_sum += float(F.cross_entropy(logits, y, ignore_index=ignore_index, reduction="sum"))
        correct += int(((logits.argmax(1) == y) & keep).sum())
        n += int(keep.sum())
        if positive is not None:
            prob = positive_probability(logits, positive)
            conf = conf + confusion(prob, y, ignore_index=ignore_index, threshold=threshold)
    out = {"loss": loss_sum / max(n, 1), "pixel_accuracy": correct / max(n, 1), "pixels": n}
    if positive is not None:
        out.update({k: v for k, v in conf.scores().items() if k != "accuracy"})
    return out


def segmentation_hooks(
    batch_size: int, positive: int | None = 1, ignore_index: int = -1
) -> LoopHooks:
    """The app loop's hooks for segmentation: pixel cross-entropy over labelled pixels; F1 of
    class ``positive`` selects the best epoch (pixel accuracy without one)."""

    def loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        logits = model(batch["x"], batch["doy"]).float()
        return F.cross_entropy(logits, batch["y"], ignore_index=ignore_index), len(batch["y"])

    def score(model: nn.Module, data: Dataset) -> dict[str, float]:
        return evaluate_segmentation(
            model, data, batch_size=batch_size, positive=positive, ignore_index=ignore_index
        )

    return LoopHooks(
        loss=loss,
        evaluate=score,
        select="f1" if positive is not None else "pixel_accuracy",
        hidden=("pixels",),
    )


def train_segmentation(
    model: nn.Module,
    train_data: Dataset,
    val_data: Dataset,
    cfg: SegTrainConfig,
    *,
    out: str | Path | None = None,
    positive: int | None = 1,
    ignore_index: int = -1,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the trainable parameters of ``model`` with the application's loop
    (:func:`slimtune.app.loop.fit`); keep the best validation epoch.

    Args:
        model: maps ``(x, doy)`` to logits (B, K, H, W); only parameters with
            ``requires_grad`` are trained (apply the PEFT methods first).
        train_data: training items (``set_epoch(epoch)`` is called when it has one: flips).
        val_data: validation items, scored after every epoch.
        cfg: optimisation settings.
        out: run folder for ``metrics.jsonl`` and the per-epoch ``checkpoint/`` (None: none).
        positive: class scored by F1 for model selection (None: select by pixel accuracy).
        ignore_index: label of unlabelled pixels.
        resume: continue from ``out/checkpoint`` when there is one.
        progress: show a progress bar per epoch.

    Returns:
        ``train_s`` (seconds spent in training steps), ``best_epoch``, ``val`` (the restored
        model's validation scores) and ``history`` (one record per epoch).
    """
    hooks = segmentation_hooks(cfg.eval_batch_size, positive, ignore_index)
    ck = Path(out) / "checkpoint" / "state.json" if out is not None else None
    res = fit(
        model,
        train_data,
        val_data,
        cfg,
        hooks,
        out=out,
        seed=True,
        resume=resume and ck is not None and ck.is_file(),
        progress=progress,
    )
    val = hooks.evaluate(model, val_data)
    return {
        "train_s": res["train_s"],
        "best_epoch": res["best_epoch"],
        "val": val,
        "history": res["history"],
    }
