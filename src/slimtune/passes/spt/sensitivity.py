"""SPT step 1: accumulated squared gradients of every candidate weight (:func:`sensitivity`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

import torch
from torch import Tensor, nn

from ...core import family_of
from ...errors import PlanError
from ...families import Family, resolve_modules
from ...linear import linear_types
from ...losses import task_loss

__all__ = ["candidates", "sensitivity"]


def candidates(model: nn.Module, family: Family | None = None) -> dict[str, nn.Parameter]:
    """The SPT pool: matrices of the family's candidate roles and vectors inside the blocks."""
    family = family or family_of(model)
    pool: dict[str, nn.Parameter] = {}
    roles = [r for r in family.candidate_roles if r in family.roles]
    if not roles:
        raise PlanError(
            f"the {family.name} family names no q/k/v/o/fc1/fc2 roles: SPT needs a known backbone family"
        )
    for name in resolve_modules(model, family, roles, kinds=linear_types()):
        pool[name + ".weight"] = cast(nn.Parameter, model.get_submodule(name).weight)
    blocks = family.block_names(model)
    for n, p in model.named_parameters():
        if p.dim() == 1 and any(n.startswith(b + ".") for b in blocks):
            pool[n] = p
    return pool


def sensitivity(
    model: nn.Module,
    batches: Iterable[dict[str, Tensor]],
    *,
    family: Family | None = None,
    n_batches: int = 16,
) -> dict[str, Tensor]:
    """Accumulated squared gradients of the mean cross-entropy for every pool parameter.

    The loss is :func:`slimtune.losses.task_loss`: classification, or next-token prediction
    for a causal LM whose batches carry token ``labels`` (``-100`` where there is no loss).

    The model is put in train mode (dropout on) for the pass and restored afterwards; the
    requires_grad flags are restored too.
    """
    pool = candidates(model, family)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was = model.training
    names = {id(p): n for n, p in pool.items()}
    for p in model.parameters():
        p.requires_grad_(id(p) in names)
    scores = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in pool.items()}
    model.train()
    done = 0
    try:
        for batch in batches:
            if done >= n_batches:
                break
            model.zero_grad(set_to_none=True)
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            out = model(**inputs)
            loss = task_loss(out, batch["labels"])
            loss.backward()
            for n, p in pool.items():
                if p.grad is not None:
                    g = p.grad.detach().float()
                    scores[n].addcmul_(g, g)  # in place: no temporary per tensor
            done += 1
    finally:
        model.zero_grad(set_to_none=True)
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.train(was)
    if done == 0:
        raise PlanError("sensitivity needs at least one batch of data")
    return scores
