"""A compact trainer for semantic segmentation of time series (TSViT on Sentinel-2 tiles).

Items are dicts ``x`` (T, C, H, W), ``doy`` (T,), ``y`` (H, W) with ``ignore_index`` on unlabelled
pixels (:class:`slimtune.data.s2.S2TileDataset`); the model maps ``(x, doy)`` to logits
(B, K, H, W). The loss is the per-pixel cross-entropy over labelled pixels only.

It reuses the classification loop's pieces (:func:`~slimtune.train.loop.param_groups`,
:func:`~slimtune.train.loop.cosine_with_warmup`, the pickle-free checkpoints): AdamW without
decay on 1-D tensors, linear warm-up then cosine decay, gradient clipping, validation after every
epoch, the best epoch's trainable tensors restored at the end, and an atomic checkpoint per epoch
so a stopped run resumes (``resume=True``) where it stopped. Model selection uses the validation
F1 of class ``positive`` when one is given (binary tasks), else pixel accuracy.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from .checkpoint import load_checkpoint, save_checkpoint, trainable_state
from .loop import cosine_with_warmup, param_groups
from .segmetrics import Confusion, confusion, positive_probability

__all__ = ["SegTrainConfig", "evaluate_segmentation", "predict", "train_segmentation"]


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
    ``positive`` thresholded at ``threshold`` (see :mod:`slimtune.train.segmetrics`).
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


def _order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    return torch.randperm(n, generator=g).tolist()


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
    """Train the trainable parameters of ``model``; keep the best validation epoch.

    Args:
        model: maps ``(x, doy)`` to logits (B, K, H, W); only parameters with
            ``requires_grad`` are trained (apply the PEFT methods first).
        train_data: training items (``set_epoch(epoch)`` is called when it has one: flips).
        val_data: validation items, scored after every epoch.
        cfg: optimisation settings.
        out: run folder for ``metrics.jsonl`` and the per-epoch ``checkpoint/`` (None: none).
        positive: class scored by F1 for model selection (None: select by pixel accuracy).
        ignore_index: label of unlabelled pixels.
        resume: continue from ``out/checkpoint``.
        progress: show a progress bar per epoch.

    Returns:
        ``train_s`` (seconds spent in training steps), ``best_epoch``, ``val`` (the restored
        model's validation scores) and ``history`` (one record per epoch).
    """
    torch.manual_seed(cfg.seed)
    dev = _device(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameter: apply a method or a head first")
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    per_epoch = math.ceil(len(train_data) / cfg.batch_size)  # type: ignore[arg-type]
    total = per_epoch * cfg.epochs
    sched = cosine_with_warmup(opt, int(cfg.warmup * total), total)
    key = "f1" if positive is not None else "pixel_accuracy"
    run = Path(out) if out is not None else None
    ck = run / "checkpoint" if run is not None else None
    start, step, train_s = 0, 0, 0.0
    best: dict[str, torch.Tensor] | None = None
    best_val, best_epoch = -1.0, -1
    history: list[dict[str, Any]] = []
    if resume and ck is not None and (ck / "state.json").is_file():
        extra, best = load_checkpoint(ck, model, opt, sched)
        start, step, train_s = extra["epoch"], extra["step"], extra["train_s"]
        best_val, best_epoch, history = extra["best_val"], extra["best_epoch"], extra["history"]
    elif run is not None:
        run.mkdir(parents=True, exist_ok=True)
        (run / "metrics.jsonl").unlink(missing_ok=True)
    for epoch in range(start, cfg.epochs):
        model.train()
        if hasattr(train_data, "set_epoch"):
            train_data.set_epoch(epoch)
        loader = DataLoader(
            Subset(train_data, _order(len(train_data), cfg.seed, epoch)),  # type: ignore[arg-type]
            batch_size=cfg.batch_size,
            shuffle=False,
        )
        bar = tqdm(
            loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress, leave=False
        )
        t0 = time.perf_counter()
        loss_sum, seen = 0.0, 0
        for batch in bar:
            logits = model(batch["x"].to(dev), batch["doy"].to(dev)).float()
            loss = F.cross_entropy(logits, batch["y"].to(dev), ignore_index=ignore_index)
            loss.backward()
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            loss_sum += loss.item() * len(batch["y"])
            seen += len(batch["y"])
            bar.set_postfix(loss=f"{loss.item():.4f}")
        train_s += time.perf_counter() - t0
        val = evaluate_segmentation(
            model,
            val_data,
            batch_size=cfg.eval_batch_size,
            positive=positive,
            ignore_index=ignore_index,
        )
        if val[key] > best_val:
            best_val, best_epoch, best = val[key], epoch, trainable_state(model)
        record = {
            "epoch": epoch + 1,
            "step": step,
            "lr": sched.get_last_lr()[0],
            "train_loss": loss_sum / max(seen, 1),
            **{f"val_{k}": v for k, v in val.items() if k != "pixels"},
            "train_s": train_s,
        }
        history.append(record)
        if progress:
            tqdm.write(
                f"epoch {epoch + 1}: loss {record['train_loss']:.4f}  val {key} {val[key]:.4f}"
            )
        if run is not None and ck is not None:
            with open(run / "metrics.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
            extra = {
                "epoch": epoch + 1,
                "step": step,
                "train_s": train_s,
                "best_val": best_val,
                "best_epoch": best_epoch,
                "history": history,
                "config": asdict(cfg),
            }
            save_checkpoint(ck, model, opt, sched, extra, best)
    if best is not None:
        with torch.no_grad():
            params = dict(model.named_parameters())
            for n, t in best.items():
                params[n].copy_(t)
    val = evaluate_segmentation(
        model,
        val_data,
        batch_size=cfg.eval_batch_size,
        positive=positive,
        ignore_index=ignore_index,
    )
    return {"train_s": train_s, "best_epoch": best_epoch + 1, "val": val, "history": history}
