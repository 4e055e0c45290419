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

from ..core import apply_plan, quantized_head
from ..passes.spt import SPTConfig, allocate, sensitivity
from ..plan import Plan

__all__ = [
    "spt_plan",
    "allocate_and_apply",
    "allocate_run",
    "allocation_summary",
    "report_lines",
]


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
    model: nn.Module,
    data: Any,
    spt: SPTConfig,
    *,
    seed: int,
    head: list[str] | None,
    head_bits: int = 32,
) -> Plan:
    """:func:`spt_plan`, then apply the plan to ``model`` (the head's linears at ``head_bits``
    when below 32: Bi-Head, as :func:`slimtune.apply` does)."""
    plan = spt_plan(model, data, spt, seed=seed, head=head)
    if head_bits != 32:
        plan.entries += quantized_head(model, plan, head_bits)
    apply_plan(model, plan)
    return plan


def allocate_run(model: nn.Module, data: Any, cfg: Any) -> Plan:
    """:func:`allocate_and_apply` with a run config's ``allocation``, seed, head and head bits."""
    if cfg.allocation is None:
        raise ValueError("allocate_run needs a run config with an allocation section")
    return allocate_and_apply(
        model,
        data,
        cfg.allocation,
        seed=cfg.train.seed,
        head=cfg.head,
        head_bits=cfg.head_bits,
    )


def allocation_summary(plan: Plan) -> dict[str, Any]:
    """Where an SPT plan put its budget (the ``allocation`` section of ``results.json``)."""
    spt = dict(plan.meta.get("spt", {}))
    modules: dict[str, int] = {}
    for e in plan.entries:
        modules[e.method] = modules.get(e.method, 0) + 1
    counts = spt.get("counts", {})
    return {
        "budget": spt.get("budget"),
        "total": spt.get("total"),
        "structured": spt.get("structured"),
        "r": spt.get("r"),
        "bits": spt.get("bits", 32),
        "unstructured": spt.get("unstructured", True),
        "modules": modules,
        "structured_targets": [e.target for e in plan.entries if e.method in ("lora", "adapter")],
        "sparse_positions": sum(int(t.numel()) for t in plan.tensors.values()),
        "params_by_kind": {
            kind: sum(c["cost"] for c in counts.values() if c["kind"] == k)
            for k, kind in ((1, "structured"), (0, "sparse"), (2, "full"))
        },
    }


def report_lines(alloc: dict[str, Any]) -> list[str]:
    """The SPT allocation section of ``report.md``."""
    bits = alloc["bits"]
    kinds = alloc["params_by_kind"]
    lines = [
        "## SPT allocation",
        "",
        f"Budget {alloc['budget']:,} parameters, allocated {alloc['total']:,}: structured "
        f"{alloc['structured']} r={alloc['r']} "
        f"({'float' if bits == 32 else f'{bits}-bit matrices'}), "
        + ("sparse deltas and vectors allowed." if alloc["unstructured"] else "structured only."),
        "",
        "| kind | parameters |",
        "|---|---:|",
        *(f"| {k} | {v:,} |" for k, v in kinds.items()),
        "",
        "Modules per method: " + ", ".join(f"{m} {n}" for m, n in sorted(alloc["modules"].items())),
        "",
    ]
    if alloc["structured_targets"]:
        lines += ["Structured modules: " + ", ".join(alloc["structured_targets"]), ""]
    return lines
