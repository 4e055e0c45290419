"""SPT in a run: score sensitivity on the run's training data, allocate, apply the plan.

Used by :func:`slimtune.app.build.build_run` when the config has an ``allocation`` section, and
by ``slimtune plan`` (which writes the plan instead of training it).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..core import apply_plan
from ..passes.spt import SPTConfig, allocate, sensitivity
from ..plan import Plan

__all__ = ["spt_plan", "allocate_and_apply"]


def spt_plan(
    model: nn.Module, data: Any, spt: SPTConfig, *, seed: int, head: list[str] | None
) -> Plan:
    """Sensitivity over ``spt.batches`` shuffled training batches, then the allocation.

    ``plan.meta["spt"]`` gets ``scores_s`` (the sensitivity pass) and ``sensitivity_s``
    (scores and allocation).
    """
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        data.train, batch_size=spt.batch_size, shuffle=True, generator=g, collate_fn=data.collate
    )
    t0 = time.perf_counter()
    scores = sensitivity(model, loader, n_batches=spt.batches)
    t1 = time.perf_counter()
    plan = allocate(model, scores, spt, head=head)
    plan.meta["spt"]["sensitivity_s"] = time.perf_counter() - t0
    plan.meta["spt"]["scores_s"] = t1 - t0
    return plan


def allocate_and_apply(
    model: nn.Module, data: Any, spt: SPTConfig, *, seed: int, head: list[str] | None
) -> Plan:
    """:func:`spt_plan`, then apply the plan to ``model``."""
    plan = spt_plan(model, data, spt, seed=seed, head=head)
    apply_plan(model, plan)
    return plan
