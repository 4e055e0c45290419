"""Apply a :class:`~slimtune.passes.lightpeft.decision.PruningDecision`: shrink the backbone and
the LoRA matrices, compensate, re-apply the smaller LoRA plan."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...core import apply_plan, family_of, get_state, remove, wrappers
from ...errors import PlanError
from ...families import Family
from ...methods.lora import LoRALinear
from ...plan import Plan, PlanEntry
from ..base_pruning import add_shifts, check_shifts, record_pruning
from ..blocks import block_infos, layer_params
from ..shrink import shrink
from .decision import PruningDecision

__all__ = ["prune"]


def prune(model: nn.Module, decision: PruningDecision, family: Family | None = None) -> Plan:
    """Apply a decision to a LoRA model, in place: shrink it and keep the surviving LoRA.

    The backbone's heads and neurons are removed physically (with the LoRA matrices alongside),
    the removed LoRA modules are taken out, the kept ones are sliced to their surviving ranks
    (``alpha`` scaled with ``r`` so ``alpha / r`` is unchanged) and re-applied with their trained
    values. Head weights are kept. ``decision.bias_shift`` is added to the named linears' biases
    first (``compensate``; rounded to float16, as a task file stores it). What was removed is
    remembered on the model (:mod:`slimtune.passes.base_pruning`), so :func:`slimtune.save`
    writes a task file that rebuilds the pruned model from the original base.

    Returns:
        The new plan (also on the model, ``slimtune.get_state(model).plan``); its
        ``meta["light_peft"]`` records the kept sizes.

    Raises:
        PlanError: the model has methods other than LoRA, or the decision keeps no rank.
    """
    family = family or family_of(model)
    state = get_state(model)
    others = sorted({e.method for e in state.plan.entries} - {"lora"})
    if others:
        raise PlanError(f"Light-PEFT prunes LoRA plans only; this plan also has {others}")
    if not decision.ranks or not any(decision.ranks.values()):
        raise PlanError("the pruning decision keeps no LoRA rank; lower module_ratio/rank_ratio")
    before = layer_params(model, family)
    shifts = {n: torch.tensor(v, dtype=torch.float32) for n, v in decision.bias_shift.items()}
    sizes = {b.name: {"heads": b.num_heads, "ffn": b.ffn} for b in block_infos(model, family)}
    check_shifts(model, shifts)
    add_shifts(model, shifts)  # every name checked before any bias changes
    shrink(model, decision.heads, decision.neurons, family)
    record_pruning(
        model,
        base=state.fingerprint,
        family=family,
        before=sizes,
        heads=decision.heads,
        neurons=decision.neurons,
        bias_shift=shifts,
    )
    lora = {n: m for n, m in wrappers(model) if isinstance(m, LoRALinear)}
    unknown = sorted(set(decision.ranks) - set(lora))
    if unknown:
        raise PlanError(f"the decision keeps ranks of modules without LoRA: {unknown}")
    entries = {e.target: e for e in state.plan.entries}
    kept: dict[str, tuple[Tensor, Tensor]] = {}
    new_entries = []
    for name, idx in decision.ranks.items():
        m = lora[name]
        if not idx:
            continue
        ix = torch.tensor(sorted(idx), dtype=torch.long, device=m.lora_A.device)
        kept[name] = (m.lora_A[ix].detach().clone(), m.lora_B[:, ix].detach().clone())
        settings = dict(entries[name].settings)
        settings["alpha"] = float(settings["alpha"]) * len(ix) / int(settings["r"])
        settings["r"] = len(ix)
        new_entries.append(PlanEntry("lora", name, settings))
    order = {e.target: i for i, e in enumerate(state.plan.entries)}
    new_entries.sort(key=lambda e: order[e.target])
    plan = Plan(
        entries=new_entries,
        head=list(state.plan.head),
        family=state.plan.family,
        meta={
            **state.plan.meta,
            "light_peft": {
                "blocks": {
                    n: {"heads": len(decision.heads[n]), "ffn": len(decision.neurons[n])}
                    for n in decision.heads
                },
                "layer_params_before": before,
                "layer_params_after": layer_params(model, family),
            },
        },
    )
    remove(model)
    apply_plan(model, plan)
    with torch.no_grad():
        for name, (a, b) in kept.items():
            w = model.get_submodule(name)
            assert isinstance(w, LoRALinear)
            w.lora_A.copy_(a)
            w.lora_B.copy_(b)
    return plan
