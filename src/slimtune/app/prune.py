"""Light-PEFT in a run: early phase -> prune -> the run's training continues on the pruned model.

Used by :func:`slimtune.app.loop.train` when the config has
``pruning: {method: light-peft, early_steps: ..., ...}`` (fields of
:class:`~slimtune.passes.lightpeft.LightPEFTConfig`). The early phase trains LoRA on the
pass's targets (the paper's six linears, r 8, alpha 16, dropout 0.05), the head and the masks
with AdamW at the run's learning rate (linear warm-up over its first 10%), records the PEFT
importance over its second half, then prunes. The run's ``methods`` are not used: the surviving
LoRA weights are what the run trains on.

The run directory gets ``pruned/`` (``decision.json`` and ``adapter/``, the stage-1 adapter as a
task file: the kept heads and neurons as bits, :mod:`slimtune.io.task`) and ``pruning.png``. A
resumed run loads ``pruned/adapter`` onto the original base instead of estimating again.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from .. import core
from ..io import atomic_write_text, save
from ..passes.blocks import layer_params
from ..passes.lightpeft import LightPEFTConfig, PruningDecision, prune
from ..passes.lightpeft.early import early_phase
from .config import RunConfig
from .plots import plot_pruning

__all__ = [
    "SHORT_EARLY_PHASE",
    "light_peft_stage",
    "report_lines",
    "short_early_phase",
]

SHORT_EARLY_PHASE = 50
"""Early phases of fewer steps get a warning: in the bench's runs (MiniLM, DINOv2-S), 30-38
steps left the heads and neurons unsorted and cost 2-3 points of accuracy; 52-131 steps did
not."""


def short_early_phase(steps: int, total_steps: int) -> str | None:
    """The warning for an early phase of ``steps`` (of a ``total_steps`` run), or ``None``."""
    if steps >= SHORT_EARLY_PHASE:
        return None
    return (
        f"the Light-PEFT early phase is {steps} steps (of {total_steps}); under "
        f"{SHORT_EARLY_PHASE} steps the masks barely separate the heads and neurons, and "
        "pruning on them can cost accuracy: give pruning.early_steps a step count or a "
        "larger fraction"
    )


class _Epochs:
    """The run's training set in a new seeded order on every pass (drop the last short batch)."""

    def __init__(self, data: Any, batch_size: int, seed: int) -> None:
        self.data, self.batch_size = data, batch_size
        self.g = torch.Generator().manual_seed(seed * 7919 + 1)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        order = torch.randperm(len(self.data.train), generator=self.g).tolist()
        return iter(
            DataLoader(
                Subset(self.data.train, order),
                batch_size=self.batch_size,
                collate_fn=self.data.collate,
                drop_last=len(order) >= self.batch_size,
            )
        )


def _early_phase(
    model: nn.Module,
    data: Any,
    cfg: RunConfig,
    lp_cfg: LightPEFTConfig,
    steps: int,
    device: torch.device,
    progress: bool,
    label: str = "early phase",
) -> tuple[PruningDecision, float]:
    """Train LoRA + head + masks for ``steps`` steps (:func:`~slimtune.passes.lightpeft.early.
    early_phase` at the run's learning rate); return the decision and the seconds."""

    def show(step: int, loss: float) -> None:
        if progress and (step % max(1, steps // 10) == 0 or step == steps):
            print(f"light-peft {label}: step {step}/{steps}  loss {loss:.4f}", flush=True)

    return early_phase(
        model,
        _Epochs(data, cfg.train.batch_size, cfg.train.seed),
        lp_cfg,
        steps,
        lr=cfg.train.lr,
        weight_decay=cfg.train.weight_decay,
        grad_clip=cfg.train.grad_clip,
        device=device,
        on_step=show,
    )


def _rescore(
    model: nn.Module,
    data: Any,
    cfg: RunConfig,
    lp_cfg: LightPEFTConfig,
    decision: PruningDecision,
    steps: int,
    device: torch.device,
    progress: bool,
) -> tuple[PruningDecision, PruningDecision, float]:
    """Prune the backbone only, then score the PEFT modules and ranks again on it.

    Returns:
        The decision to apply to the (now backbone-pruned) model, the decision to report (the
        early phase's heads and neurons with the re-scored LoRA ranks, in the original
        indexing) and the seconds the re-scoring took.
    """
    every_rank = {n: list(range(r)) for n, r in decision.lora_before.items()}
    prune(model, dataclasses.replace(decision, ranks=every_rank))
    # heads and neurons are decided already: nothing of the backbone is scored or pruned again
    again = dataclasses.replace(
        lp_cfg,
        head_ratio=0.0,
        ffn_ratio=0.0,
        rescore_steps=0,
        backbone_score="mask",
        compensate=False,
    )
    peft, seconds = _early_phase(model, data, cfg, again, steps, device, progress, "re-scoring")
    scores = {
        **decision.scores,
        "module_importance_early": decision.scores["module_importance"],
        "rank_importance_early": decision.scores["rank_importance"],
        "module_importance": peft.scores["module_importance"],
        "rank_importance": peft.scores["rank_importance"],
    }
    report = dataclasses.replace(decision, ranks=peft.ranks, scores=scores)
    return peft, report, seconds


def _lora_params(model: nn.Module) -> int:
    return sum(n for m, n in core.summary(model).by_method.items() if m == "lora")


def light_peft_stage(
    model: nn.Module,
    data: Any,
    cfg: RunConfig,
    out: str | Path,
    *,
    total_steps: int,
    device: torch.device,
    resume: bool = False,
    write: bool = True,
    progress: bool = True,
    keep_lora: bool = True,
) -> tuple[nn.Module, dict[str, Any]]:
    """Estimate and prune a plain (method-free) model; return it with LoRA applied and a report.

    Args:
        model: the run's freshly loaded model (no methods applied).
        data: the run's task.
        cfg: the run config (``cfg.pruning`` set).
        out: the run directory.
        total_steps: the run's total steps (for a fractional ``early_steps``).
        device: where to train.
        resume: reload ``out/pruned`` when it exists instead of estimating again.
        write: write files (only the main process does).
        progress: print progress lines.
        keep_lora: ``False`` when another pass follows (the composition): only the backbone is
            pruned (every LoRA rank kept, no re-scoring); the caller takes the early phase's
            LoRA off (:func:`slimtune.passes.compose.early_lora` keeps its matrices) before the
            next pass.

    Returns:
        The pruned model (LoRA on the surviving modules, trainable head) and the pruning
        section of ``results.json``.
    """
    lp_cfg = cfg.pruning
    if lp_cfg is None:
        raise ValueError("light_peft_stage needs a run config with a pruning section")
    out = Path(out)
    pdir = out / "pruned"
    model.to(device)
    if resume and (pdir / "decision.json").is_file():
        info = json.loads((pdir / "decision.json").read_text(encoding="utf-8"))
        from .rebuild import attach

        backbone = pdir / "backbone"  # written by runs before task files
        attach(model, pdir / "adapter", backbone=backbone if backbone.is_dir() else None)
        model.to(device)
        return model, info["report"]
    core.apply(model, lp_cfg.lora(), head=cfg.head)
    before = layer_params(model)
    first = core.summary(model)
    backbone_before, trainable_before = first.base, first.trainable
    lora_before = _lora_params(model)
    steps = lp_cfg.steps(total_steps)
    short = short_early_phase(steps, total_steps)
    if short is not None:
        warnings.warn(short, stacklevel=2)
    decision, seconds = _early_phase(model, data, cfg, lp_cfg, steps, device, progress)
    if not keep_lora:  # the next pass decides the methods: nothing of the LoRA is pruned
        decision.ranks = {n: list(range(r)) for n, r in decision.lora_before.items()}
    rescore = lp_cfg.rescoring_steps(total_steps) if keep_lora else 0
    rescore_s = 0.0
    if rescore:
        to_apply, decision, rescore_s = _rescore(
            model, data, cfg, lp_cfg, decision, rescore, device, progress
        )
    else:
        to_apply = decision
    plan = prune(model, to_apply)
    after = layer_params(model)
    summary = core.summary(model)
    report = {
        "method": "light-peft",
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(lp_cfg).items()},
        "early_steps": steps,
        "early_s": round(seconds, 2),
        "early_phase_warning": short,
        "then_allocation": not keep_lora,
        "rescore_steps": rescore,
        "rescore_s": round(rescore_s, 2),
        "layer_params_before": before,
        "layer_params_after": after,
        "pruned_fraction": 1 - after / before,
        "backbone_params_before": backbone_before,
        "backbone_params_after": summary.base,
        "lora_params_before": lora_before,
        "lora_params_after": _lora_params(model),
        "trainable_params_before": trainable_before,
        "trainable_params_after": summary.trainable,
        "lora_modules_before": len(decision.lora_before),
        "lora_modules_after": len(plan.entries),
        "lora_ranks_before": sum(decision.lora_before.values()),
        "lora_ranks_after": sum(len(v) for v in decision.ranks.values()),
        "blocks": [
            {
                "block": b,
                "heads": [decision.before[b]["heads"], len(decision.heads[b])],
                "ffn": [decision.before[b]["ffn"], len(decision.neurons[b])],
            }
            for b in decision.heads
        ],
    }
    if write:
        # a task file: the kept heads and neurons (and shifts) with the LoRA and head, loaded
        # onto the original base on resume (slimtune.io.task)
        save(model, pdir / "adapter")
        atomic_write_text(
            pdir / "decision.json",
            json.dumps({"report": report, "decision": decision.to_dict()}, indent=1),
        )
        plot_pruning(decision, out / "pruning.png", title=f"{cfg.name}: Light-PEFT pruning")
    return model, report


def report_lines(pruning: dict[str, Any]) -> list[str]:
    """The Light-PEFT section of ``report.md``."""
    rows = [
        "## Light-PEFT pruning",
        "",
        f"Early phase: {pruning['early_steps']} steps ({pruning['early_s']:.1f} s).",
        "",
        *(
            [
                f"PEFT modules and ranks re-scored on the pruned backbone: "
                f"{pruning['rescore_steps']} steps ({pruning['rescore_s']:.1f} s).",
                "",
            ]
            if pruning.get("rescore_steps")
            else []
        ),
        *(
            [
                "Composition: only the backbone was pruned here; the early phase's LoRA was "
                "taken off afterwards (its head kept) and the allocation below decides the "
                "methods on the pruned model"
                + (
                    f"; {len(pruning['warm_started'])} of its LoRA modules start from the early "
                    "phase's matrices (warm start)."
                    if pruning.get("warm_started")
                    else "."
                ),
                "",
            ]
            if pruning.get("then_allocation")
            else []
        ),
        *(
            [f"**Warning**: {pruning['early_phase_warning']}.", ""]
            if pruning.get("early_phase_warning")
            else []
        ),
        "| | before | after |",
        "|---|---:|---:|",
        f"| transformer-layer params (attention + FFN) | {pruning['layer_params_before']:,} | "
        f"{pruning['layer_params_after']:,} |",
        f"| backbone params | {pruning['backbone_params_before']:,} | {pruning['backbone_params_after']:,} |",
        f"| LoRA modules | {pruning['lora_modules_before']} | {pruning['lora_modules_after']} |",
        f"| LoRA ranks | {pruning['lora_ranks_before']} | {pruning['lora_ranks_after']} |",
        f"| trainable params | {pruning['trainable_params_before']:,} | {pruning['trainable_params_after']:,} |",
        "",
        f"Pruned fraction of the transformer layers: {pruning['pruned_fraction']:.3f}.",
        "",
        "| block | heads | FFN neurons |",
        "|---|---:|---:|",
    ]
    rows += [
        f"| {b['block']} | {b['heads'][0]} -> {b['heads'][1]} | {b['ffn'][0]} -> {b['ffn'][1]} |"
        for b in pruning["blocks"]
    ]
    rows += ["", "![pruning](pruning.png)", ""]
    return rows
