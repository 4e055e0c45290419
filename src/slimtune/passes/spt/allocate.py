"""SPT step 3: a threshold -> sparse and structured (LoRA/adapter) tuning -> a plan at the budget."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ...core import family_of
from ...errors import PlanError
from ...families import Family
from ...linear import dims, is_linear
from ...plan import SLOT, Plan, PlanEntry
from ...qbase.model import base_tensors
from .config import SPTConfig, parse_budget
from .threshold import sorted_scores_of, topk_threshold, topk_thresholds

__all__ = ["allocate"]


@dataclass
class _Alloc:
    total: int
    entries: list[PlanEntry] = field(default_factory=list)
    tensors: dict[str, Tensor] = field(default_factory=dict)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)


def _struct_cost(cfg: SPTConfig, d_in: int, d_out: int) -> int:
    """Trainable parameters of a structured module (a low-bit adapter has no biases)."""
    r = cfg.r
    if cfg.structured == "lora":
        return r * (d_in + d_out)
    return 2 * d_out * r + (r + d_out if cfg.bits == 32 else 0)


def _io(name: str, s: Tensor, io: dict[str, tuple[int, int]] | None) -> tuple[int, int]:
    """``(in, out)`` of a weight: from ``io`` (Conv1D stores ``[in, out]``) or its shape."""
    if io is not None and name in io:
        return io[name]
    d_out, d_in = s.shape
    return d_in, d_out


def _totals_at(
    scores: dict[str, Tensor],
    sorted_scores: dict[str, Tensor],
    thr: Tensor,
    cfg: SPTConfig,
    extra: int,
    io: dict[str, tuple[int, int]] | None = None,
) -> Tensor:
    """Plan totals for many thresholds at once (the counting part of :func:`_allocate_at`)."""
    totals = torch.full(thr.shape, extra, dtype=torch.int64)
    for name, s in scores.items():
        st = sorted_scores[name]
        c = st.numel() - torch.searchsorted(st, thr.to(st.device)).cpu()
        if s.dim() == 2:
            d_in, d_out = _io(name, s, io)
            cost = _struct_cost(cfg, d_in, d_out)
            totals += torch.where(
                c.double() >= cost / cfg.alpha, cost, c if cfg.unstructured else 0
            )
        elif cfg.unstructured:
            totals += torch.where(c.double() >= s.numel() / cfg.beta, s.numel(), c)
    return totals


def _allocate_at(
    scores: dict[str, Tensor],
    sorted_scores: dict[str, Tensor],
    thr: float,
    cfg: SPTConfig,
    extra: int,
    materialise: bool,
    io: dict[str, tuple[int, int]] | None = None,
) -> _Alloc:
    total = extra
    out = _Alloc(total=0)
    for name, s in scores.items():
        st = sorted_scores[name]
        c = st.numel() - int(torch.searchsorted(st, torch.tensor([thr], device=st.device)))
        if c == 0:
            continue
        module, _, attr = name.rpartition(".")
        if s.dim() == 2:
            d_in, d_out = _io(name, s, io)
            cost = _struct_cost(cfg, d_in, d_out)
            if c >= cost / cfg.alpha:
                total += cost
                out.counts[name] = {"kind": 1, "count": c, "cost": cost}
                if materialise:
                    out.entries.append(_structured_entry(cfg, module))
                continue
            if not cfg.unstructured:
                continue
            total += c
            out.counts[name] = {"kind": 0, "count": c, "cost": c}
        else:
            if not cfg.unstructured:
                continue
            if c >= s.numel() / cfg.beta:
                total += s.numel()
                out.counts[name] = {"kind": 2, "count": c, "cost": s.numel()}
                if materialise:
                    out.entries.append(PlanEntry("full", name, {"kind": "param"}))
                continue
            total += c
            out.counts[name] = {"kind": 0, "count": c, "cost": c}
        if materialise:
            idx = torch.nonzero(s.reshape(-1) >= thr).reshape(-1).cpu()
            key = f"sparse/{name}"
            out.tensors[key] = idx
    if materialise:
        by_module: dict[str, dict[str, str]] = {}
        for key in out.tensors:
            pname = key[len("sparse/") :]
            module, _, attr = pname.rpartition(".")
            by_module.setdefault(module, {})[attr] = key
        out.entries += [PlanEntry("sparse", m, {"params": a}) for m, a in by_module.items()]
    out.total = total
    return out


def _top_up(
    alloc: _Alloc,
    scores: dict[str, Tensor],
    sorted_scores: dict[str, Tensor],
    thr: float,
    budget: int,
) -> None:
    """Spend what the threshold left of the budget on the next most sensitive sparse positions.

    Only tensors tuned sparsely (or not at all) at the threshold receive extra positions, so the
    structured/full decisions made at the threshold stay as they are.
    """
    remainder = budget - alloc.total
    if remainder <= 0:
        return
    fixed = {n for n, c in alloc.counts.items() if c["kind"] != 0}
    below = {}
    for n, st in sorted_scores.items():
        if n in fixed:
            continue
        cut = int(torch.searchsorted(st, torch.tensor([thr], device=st.device)))
        if cut > 0:
            below[n] = st[:cut]
    avail = sum(t.numel() for t in below.values())
    if avail == 0:
        return
    k = min(remainder, avail)
    thr2 = topk_threshold(list(below.values()), k)
    added = 0
    for n in below:
        s = scores[n].reshape(-1)
        idx = torch.nonzero((s >= thr2) & (s < thr)).reshape(-1).cpu()
        idx = idx[: max(0, k - added)]
        if idx.numel() == 0:
            continue
        added += idx.numel()
        key = f"sparse/{n}"
        alloc.tensors[key] = (
            torch.cat([alloc.tensors.get(key, torch.empty(0, dtype=torch.long)), idx]).sort().values
        )
        info = alloc.counts.setdefault(n, {"kind": 0, "count": 0, "cost": 0})
        info["extra"] = info.get("extra", 0) + idx.numel()
        info["cost"] += idx.numel()
    alloc.total += added
    alloc.entries = [e for e in alloc.entries if e.method != "sparse"]
    by_module: dict[str, dict[str, str]] = {}
    for key in alloc.tensors:
        module, _, attr = key[len("sparse/") :].rpartition(".")
        by_module.setdefault(module, {})[attr] = key
    alloc.entries += [PlanEntry("sparse", m, {"params": a}) for m, a in by_module.items()]


def _structured_entry(cfg: SPTConfig, module: str) -> PlanEntry:
    settings: dict[str, Any]
    if cfg.structured == "lora":
        settings = {
            "r": cfg.r,
            "alpha": float(cfg.lora_alpha or cfg.r),
            "dropout": 0.0,
            "bits": cfg.bits,
            "criterion": "l1",
        }
    else:
        settings = {
            "dim": cfg.r,
            "placement": "sequential",
            "scale": 1.0,
            "activation": "gelu",
            "bias": cfg.bits == 32,
            "dropout": 0.0,
            "bits": cfg.bits,
            "criterion": "l1",
            "read": None,
        }
    return PlanEntry(cfg.structured, module, settings)  # fmt: skip


def _with_reserve(
    model: nn.Module,
    scores: dict[str, Tensor],
    cfg: SPTConfig,
    family: Family,
    head: list[str],
    budget: int,
) -> Plan:
    """``per_block``: one structured module per block on its most sensitive matrix, in block
    order, while ``per_block * budget`` lasts; then SPT's allocation of the rest elsewhere."""
    import dataclasses

    reserve = int(cfg.per_block * budget)
    by_block: dict[int, list[str]] = {}
    for name, sc in scores.items():
        m = re.search(r"\.(\d+)\.", name)
        module = name.rpartition(".")[0]
        if sc.dim() == 2 and m is not None and is_linear(model.get_submodule(module)):
            by_block.setdefault(int(m[1]), []).append(name)
    picked: list[PlanEntry] = []
    counts: dict[str, dict[str, int]] = {}
    used: set[str] = set()
    spent = 0
    for block in sorted(by_block):
        best = max(by_block[block], key=lambda n: float(scores[n].sum()))
        d_in, d_out = dims(model.get_submodule(best.rpartition(".")[0]))
        cost = _struct_cost(cfg, d_in, d_out)
        if spent + cost > reserve:
            break
        spent += cost
        used.add(best)
        picked.append(_structured_entry(cfg, best.rpartition(".")[0]))
        counts[best] = {"kind": 1, "count": 0, "cost": cost, "reserved": 1}
    rest = dataclasses.replace(cfg, budget=max(1, budget - spent), per_block=0.0)
    plan = allocate(model, {n: s for n, s in scores.items() if n not in used}, rest,
                    family=family, head=head)  # fmt: skip
    plan.entries = sorted(
        [e for e in plan.entries if e.method != "full"] + picked, key=_by_role
    ) + [e for e in plan.entries if e.method == "full"]
    meta = plan.meta["spt"]
    meta["counts"] = {**meta.get("counts", {}), **counts}
    meta.update(budget=budget, total=meta["total"] + spent, per_block=cfg.per_block,
                reserved=spent, reserved_modules=[e.target for e in picked])  # fmt: skip
    return plan


def _by_role(entry: PlanEntry) -> tuple[str, str, int]:
    """Sort key: method, the target with its first block index taken out, that index."""
    m = re.search(r"\.(\d+)\.", entry.target)
    if m is None:
        return entry.method, entry.target, -1
    return entry.method, entry.target[: m.start(1)] + SLOT + entry.target[m.end(1) :], int(m[1])


def allocate(
    model: nn.Module,
    scores: dict[str, Tensor],
    cfg: SPTConfig,
    *,
    family: Family | None = None,
    head: list[str] | None = None,
) -> Plan:
    """Build the SPT plan whose trainable count (head excluded) is closest to the budget."""
    family = family or family_of(model)
    head = (
        family.role_names(model, "head")
        if head is None and "head" in family.roles
        else (head or [])
    )
    base = sum(  # logical sizes: a quantized base counts its [out, in] weights and int8 tables
        shape.numel()
        for n, _, shape in base_tensors(model)
        if not any(n.startswith(h + ".") for h in head)
    )
    budget = parse_budget(cfg.budget, base)
    if cfg.per_block > 0:
        return _with_reserve(model, scores, cfg, family, head, budget)
    cls = [n for n, _ in model.named_parameters() if re.search(r"(cls_token|temporal_token)$", n)]
    cls = cls if cfg.unstructured else []
    extra = sum(model.get_parameter(n).numel() for n in cls)
    pool = sum(s.numel() for s in scores.values())
    if budget > pool + extra:
        raise PlanError(f"budget {budget:,} exceeds the SPT pool of {pool + extra:,} parameters")
    sorted_scores = {n: sorted_scores_of(s) for n, s in scores.items()}
    ordered = list(sorted_scores.values())
    io = {
        n: dims(model.get_submodule(n.rpartition(".")[0]))
        for n, s in scores.items()
        if s.dim() == 2 and is_linear(model.get_submodule(n.rpartition(".")[0]))
    }

    def totals_at(taus: list[int]) -> list[int]:
        thr = topk_thresholds(ordered, taus)
        return [int(v) for v in _totals_at(scores, sorted_scores, thr, cfg, extra, io)]

    def total_at(tau: int) -> int:
        return totals_at([tau])[0]

    # Coarse log grid, then bisection inside the bracket that crosses the budget.
    grid = sorted({max(1, min(pool, int(round(pool ** (i / 40))))) for i in range(41)})
    totals = list(zip(grid, totals_at(grid), strict=True))
    most = max(v for _, v in totals)
    if most < 0.99 * budget:
        raise PlanError(
            f"budget {budget:,} is more than SPT can allocate here: with every sensitive matrix "
            f"structured at r={cfg.r}"
            + (" and every vector tuned" if cfg.unstructured else "")
            + f", the plan holds {most:,} parameters; raise r or lower the budget"
        )
    best = min(totals, key=lambda tt: abs(tt[1] - budget))
    lo = max([t for t, v in totals if v <= budget], default=1)
    hi = min([t for t, v in totals if v >= budget], default=pool)
    if lo > hi:
        lo, hi = hi, lo
    # Totals grow with tau: narrow the bracket 64 taus at a time (one threshold search each).
    for _ in range(40):
        if hi - lo <= 1:
            break
        taus = sorted({lo + (hi - lo) * j // 64 for j in range(1, 64)} - {lo, hi})
        for t, v in zip(taus, totals_at(taus), strict=True):
            if abs(v - budget) < abs(best[1] - budget):
                best = (t, v)
            if v < budget:
                lo = max(lo, t)
            else:
                hi = min(hi, t)
    # Totals jump when a vector turns full or a matrix turns structured: look around the best
    # tau for a closer total.
    span = max(8, min(256, best[0] // 20))
    if abs(best[1] - budget) > 0.001 * budget:
        window = list(range(max(1, best[0] - span), min(pool, best[0] + span) + 1))
        for t, v in zip(window, totals_at(window), strict=True):
            if abs(v - budget) < abs(best[1] - budget):
                best = (t, v)
    # The closest total, or the closest from below topped up with extra sparse positions.
    options = [best]
    under = [tv for tv in totals + [best] if tv[1] <= budget]
    if under:
        options.append(max(under, key=lambda tv: tv[1]))
    allocs = []
    for tau, _ in options:
        thr = topk_threshold(ordered, tau)
        alloc = _allocate_at(scores, sorted_scores, thr, cfg, extra, True, io)
        if cfg.unstructured:
            _top_up(alloc, scores, sorted_scores, thr, budget)
        allocs.append((abs(alloc.total - budget), tau, thr, alloc))
    _, tau, thr, alloc = min(allocs, key=lambda a: a[0])
    # one role after the other, by block: a plan whose structured modules sit in a few blocks
    # then stores as a few groups (`o_proj` of blocks 8-11 is one entry), not one per module
    entries = sorted(alloc.entries, key=_by_role) + [
        PlanEntry("full", n, {"kind": "param"}) for n in cls
    ]
    meta = {
        "spt": {
            "budget": budget,
            "total": alloc.total,
            "tau": tau,
            "threshold": thr,
            "structured": cfg.structured,
            "r": cfg.r,
            "bits": cfg.bits,
            "unstructured": cfg.unstructured,
            "alpha": cfg.alpha,
            "beta": cfg.beta,
            "pool": pool,
            "counts": alloc.counts,
        }
    }
    return Plan(
        entries=entries, head=list(head), family=family.name, tensors=alloc.tensors, meta=meta
    )
