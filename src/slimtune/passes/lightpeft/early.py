"""Light-PEFT stage 1 as a function: train LoRA, head and masks for a few steps, then decide."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ...losses import task_loss
from .config import LightPEFTConfig
from .decision import PruningDecision
from .scorer import LightPEFT

__all__ = ["early_phase"]


def _inputs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v for k, v in batch.items() if k != "labels"}


def early_phase(
    model: nn.Module,
    batches: Iterable[dict[str, Tensor]],
    config: LightPEFTConfig,
    steps: int,
    *,
    lr: float,
    weight_decay: float = 1e-4,
    grad_clip: float = 1.0,
    device: torch.device | None = None,
    loss_fn: Callable[[Any, Tensor], Tensor] = task_loss,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[PruningDecision, float]:
    """Train the LoRA model's trainable tensors and Light-PEFT's masks for ``steps`` steps.

    AdamW at ``lr`` (masks at ``config.mask_lr`` or ``lr``; no weight decay on vectors and
    masks), linear warm-up over the first 10% of the steps, the masks' L1 penalty added to the
    task loss; the importance is recorded over the second half. ``batches`` is iterated again
    (a new epoch) until the steps are done, so a shuffling ``DataLoader`` shuffles each time.

    Args:
        model: a model with LoRA applied (``slimtune.apply(model, config.lora())``).
        batches: dicts of model inputs with ``labels``.
        config: the Light-PEFT settings.
        steps: optimizer steps.
        lr: learning rate.
        weight_decay: AdamW weight decay of the matrices.
        grad_clip: max gradient norm (0 = off).
        device: where batches go (default: the model's).
        loss_fn: ``(model output, labels) -> loss`` (default: cross-entropy).
        on_step: called with ``(step, loss)`` after every step (progress).

    Returns:
        The pruning decision (:meth:`LightPEFT.decide`; masks taken out again) and the seconds.
    """
    if steps < 1:
        raise ValueError(f"the early phase needs at least one step, got {steps}")
    device = device or next(model.parameters()).device
    lp = LightPEFT(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
            {"params": lp.mask_parameters(), "weight_decay": 0.0, "lr": config.mask_lr or lr},
        ],
        lr=lr,
    )
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    model.train()
    step, t0 = 0, time.perf_counter()
    try:
        while step < steps:
            empty = True
            for batch in batches:
                empty = False
                if step >= steps:
                    break
                lp.recording = step >= steps // 2
                batch = {k: v.to(device) for k, v in batch.items()}
                loss = loss_fn(model(**_inputs(batch)), batch["labels"]) + lp.penalty()
                loss.backward()
                lp.after_backward()
                if grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, grad_clip)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                if on_step is not None:
                    on_step(step, float(loss.item()))
            if empty:
                raise ValueError("the early phase got no batches")
        seconds = time.perf_counter() - t0
        decision = lp.decide()
    finally:
        lp.remove()
    return decision, seconds
