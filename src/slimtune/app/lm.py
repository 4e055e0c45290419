"""Causal language-model runs (``objective: causal-lm``): data and loop hooks.

A causal-LM task (:func:`slimtune.app.data.decoder.load_lm_task`) is prompt/response pairs.
Training minimises the next-token loss on the response tokens only (:class:`LMCollator` labels
the prompt and the padding ``-100``); evaluation scores each class's response by likelihood
(``accuracy``, e.g. `` positive`` vs `` negative``) or generates greedily and compares the
normalised text (``exact_match``). The selection score is that metric; ``loss`` is the mean
response-token loss.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..losses import task_loss
from .data.base import TaskData
from .data.decoder import LMTask
from .data.lm_collate import LMCollator, LMDataset
from .lm_eval import _inference, choice_accuracy, exact_match
from .loop import Batch, LoopHooks

__all__ = ["lm_task_data", "lm_hooks", "response_loss"]


def lm_task_data(
    task: LMTask, tokenizer: Any, max_length: int = 256, *, pack: bool = False
) -> TaskData:
    """``task`` as a :class:`TaskData` (kind ``"lm"``) whose items are prompt/response pairs.

    ``num_classes`` is the number of choices (0 for generation tasks); ``collate`` tokenises
    a batch with the response-only labels, one padded row per example (evaluation never
    packs); with ``pack`` the training loader's collate is :func:`train_collate`'s.
    """
    return TaskData(
        name=task.name,
        kind="lm",
        num_classes=len(task.choices or ()),
        class_names=task.class_names,
        train=LMDataset(task.train),
        val=LMDataset(task.val),
        test=LMDataset(task.test),
        collate=cast(Any, LMCollator(tokenizer, max_length)),  # takes PromptPairs
    )


def train_collate(data: TaskData, pack: bool) -> Any:
    """The training loader's collate: ``data.collate``, or the same tokenizer packing rows."""
    if not pack:
        return data.collate
    padded = data.collate
    assert isinstance(padded, LMCollator)
    return LMCollator(padded.tokenizer, padded.max_length, pack=True)


@torch.no_grad()
def response_loss(
    model: nn.Module, data: Dataset, collate: Any, batch_size: int, device: torch.device
) -> float:
    """Mean next-token loss over the response tokens of ``data`` (weighted by tokens)."""
    total, tokens = 0.0, 0
    with _inference(model):
        for batch in DataLoader(data, batch_size=batch_size, collate_fn=collate):
            batch = {k: v.to(device) for k, v in batch.items()}
            n = int((batch["labels"][:, 1:] != -100).sum())
            if n == 0:
                continue
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            total += float(task_loss(out, batch["labels"])) * n
            tokens += n
    return total / tokens if tokens else math.nan


def lm_hooks(
    task: LMTask,
    data: TaskData,
    tokenizer: Any,
    *,
    batch_size: int,
    max_length: int,
    device: torch.device,
    autocast: Any,
    max_new_tokens: int = 32,
    pack: bool = False,
) -> LoopHooks:
    """:class:`LoopHooks` of a causal-LM task: response-token loss; the task's metric selects."""
    metric = task.metric

    def loss(model: nn.Module, batch: Batch) -> tuple[Tensor, int]:
        with autocast():
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            value = task_loss(out, batch["labels"])
        return value, len(batch["input_ids"])

    def score(model: nn.Module, split: Dataset) -> dict[str, float]:
        assert isinstance(split, LMDataset)
        pairs = split.pairs
        with autocast():
            if task.choices is not None:
                value = choice_accuracy(
                    model,
                    tokenizer,
                    pairs,
                    task.choices,
                    batch_size=batch_size,
                    max_length=max_length,
                )
            else:
                value = exact_match(
                    model,
                    tokenizer,
                    pairs,
                    max_new_tokens=max_new_tokens,
                    batch_size=batch_size,
                    max_length=max_length,
                )
            lm_loss = response_loss(model, split, data.collate, batch_size, device)
        return {metric: value, "loss": lm_loss}

    return LoopHooks(loss=loss, evaluate=score, select=metric, collate=train_collate(data, pack))
