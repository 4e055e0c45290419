"""The task loss of a model's output: classification or next-token prediction.

``labels`` of shape ``[batch]`` are classes (cross-entropy over ``logits [batch, classes]``);
``labels`` of shape ``[batch, seq]`` with ``logits [batch, seq, vocab]`` are token targets of a
causal language model: position ``t`` predicts token ``t + 1`` (the shift is done here, as
Hugging Face's causal LMs do), and ``-100`` marks positions without a loss (the prompt and the
padding when only responses are learned).
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

__all__ = ["IGNORE", "logits_of", "task_loss"]

IGNORE = -100
"""Label of positions that carry no loss."""


def logits_of(out: Any) -> Tensor:
    """The logits of a model output (an object with ``.logits``, or a tensor)."""
    logits = getattr(out, "logits", out)
    if not isinstance(logits, Tensor):
        raise TypeError(f"the model returned {type(out).__name__}, which has no logits")
    return logits


def task_loss(out: Any, labels: Tensor) -> Tensor:
    """Mean cross-entropy of ``out`` against ``labels`` (classes or shifted tokens)."""
    logits = logits_of(out).float()
    if logits.dim() == 3 and labels.dim() == 2:
        return F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            labels[:, 1:].reshape(-1),
            ignore_index=IGNORE,
        )
    return F.cross_entropy(logits, labels)
