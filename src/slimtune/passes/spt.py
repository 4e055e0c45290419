"""SPT: sensitivity-aware parameter allocation (He et al., ICCV 2023).

1. **Sensitivity.** With the task head attached and the model in train mode, accumulate
   ``s = sum over batches (dL/dw)^2`` for every candidate weight (q/k/v/o/fc1/fc2 matrices
   and every norm/bias vector inside the blocks; head, CLS and embeddings excluded).
2. **Threshold without concatenation.** The top-``tau`` threshold over all candidate entries is
   the ``tau``-th largest score. Each tensor's scores are sorted once; the threshold is found by
   bisection over the (monotone) bit patterns of non-negative float32 values, counting entries
   above a candidate with ``searchsorted`` per tensor. No tensor of all scores is ever built, and
   the result equals ``torch.cat(scores).topk(tau).values[-1]`` exactly.
3. **Allocation.** For a threshold, a matrix with ``c`` sensitive entries gets LoRA/adapter if
   ``c >= P_struct / alpha`` (``P_struct`` its cost at rank ``r``) and ``c`` sparse positions
   otherwise; a vector is tuned fully if ``c >= len / beta``, else sparsely. ``tau`` is swept to
   make the total closest to the budget.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import PlanError
from ..families import Family, detect_family, resolve_modules
from ..plan import Plan, PlanEntry

__all__ = [
    "SPTConfig",
    "candidates",
    "sensitivity",
    "topk_threshold",
    "topk_thresholds",
    "allocate",
    "parse_budget",
    "allocate_from_config",
    "plot_allocation",
]


@dataclass
class SPTConfig:
    """SPT allocation settings.

    Attributes:
        budget: trainable parameters in the pool (``"0.5M"``, ``"200k"``, ``20000``) or a
            fraction of the backbone (``"0.5%"``). The head is not counted.
        structured: ``lora`` or ``adapter``.
        r: rank (LoRA) or bottleneck width (adapter) of structured modules.
        lora_alpha: LoRA scaling numerator (the paper uses no scaling: alpha = r).
        alpha: a matrix goes structured when ``c >= P_struct / alpha``.
        beta: a vector is tuned fully when ``c >= len / beta``.
        batches: number of batches for the sensitivity pass.
        batch_size: batch size of the sensitivity pass.
    """

    budget: Any = "0.5%"
    structured: str = "lora"
    r: int = 8
    lora_alpha: float | None = None
    alpha: float = 10.0
    beta: float = 5.0
    batches: int = 16
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.structured not in ("lora", "adapter"):
            raise PlanError(
                f"SPT structured method must be 'lora' or 'adapter', got {self.structured!r}"
            )
        if not isinstance(self.r, int) or self.r < 1:
            raise PlanError(f"SPT rank r must be a positive integer, got {self.r!r}")
        if self.alpha <= 0 or self.beta <= 0:
            raise PlanError(
                f"SPT thresholds alpha and beta must be > 0, got {self.alpha}, {self.beta}"
            )
        if self.batches < 1 or self.batch_size < 1:
            raise PlanError("SPT needs at least one batch of at least one example")


def parse_budget(budget: Any, base_params: int) -> int:
    """``"0.5M"`` -> 500000, ``"200k"`` -> 200000, ``"0.5%"`` -> 0.5% of ``base_params``."""
    text = str(budget).strip().lower().replace("_", "")
    try:
        if text.endswith("%"):
            value = float(text[:-1]) / 100 * base_params
        elif text[-1:] in ("k", "m", "b"):
            value = float(text[:-1]) * {"k": 1e3, "m": 1e6, "b": 1e9}[text[-1]]
        else:
            value = float(text)
    except ValueError as exc:
        raise PlanError(
            f"budget {budget!r} is not a count (e.g. 500000, '0.5M', '200k') or a fraction ('0.5%')"
        ) from exc
    n = int(round(value))
    if n <= 0:
        raise PlanError(f"budget must be positive, got {budget!r}")
    if n > base_params:
        raise PlanError(f"budget {budget!r} ({n:,}) exceeds the model's {base_params:,} parameters")
    return n


def candidates(model: nn.Module, family: Family | None = None) -> dict[str, nn.Parameter]:
    """The SPT pool: matrices of the family's candidate roles and vectors inside the blocks."""
    family = family or detect_family(model)
    pool: dict[str, nn.Parameter] = {}
    roles = [r for r in family.candidate_roles if r in family.roles]
    if not roles:
        raise PlanError(
            f"the {family.name} family names no q/k/v/o/fc1/fc2 roles: SPT needs a known backbone family"
        )
    for name in resolve_modules(model, family, roles, kinds=(nn.Linear,)):
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
            loss = F.cross_entropy(getattr(out, "logits", out).float(), batch["labels"])
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


def _sorted(x: Tensor, descending: bool = False) -> Tensor:
    """The values of ``x`` (flattened) in order.

    On CPU, float32 goes through numpy's vectorised sort, about 10x faster than ``torch.sort``
    on the 2-core machines this runs on (the SPT pass sorts every candidate tensor once); the
    result is the same (NaN last, or first when descending, as in torch).
    """
    flat = x.reshape(-1)
    if flat.device.type != "cpu" or flat.dtype != torch.float32:
        return flat.sort(descending=descending).values
    out = np.sort(flat.detach().numpy())
    return torch.from_numpy(np.ascontiguousarray(out[::-1]) if descending else out)


def _bits(x: Tensor) -> Tensor:
    return x.float().contiguous().view(torch.int32)


def topk_threshold(sorted_scores: list[Tensor], k: int) -> float:
    """The ``k``-th largest value over several *ascending-sorted* non-negative tensors.

    Bisection over float32 bit patterns; counts per tensor via ``searchsorted``.
    """
    return float(topk_thresholds(sorted_scores, [k])[0])


def topk_thresholds(sorted_scores: list[Tensor], ks: list[int]) -> Tensor:
    """:func:`topk_threshold` for several ranks at once (one float32 value per rank).

    All ranks are searched together: each round makes one ``searchsorted`` call per tensor with
    16 candidates per rank, so the cost hardly grows with the number of ranks.
    """
    total = sum(t.numel() for t in sorted_scores)
    k = torch.as_tensor(ks, dtype=torch.int64).reshape(-1)
    if k.numel() == 0 or int(k.min()) < 1 or int(k.max()) > total:
        raise PlanError(f"threshold rank k must be in [1, {total}], got {ks}")
    # Largest bit pattern b with count(score >= b) >= k is the k-th largest value; non-negative
    # float32 values order like their bit patterns. 0 always qualifies, +inf is the ceiling.
    # Each round tries 16 evenly spaced patterns in (lo, hi] per rank: 8 rounds instead of 31.
    if k.numel() > 8:
        near = _close_ranks(sorted_scores, k)
        if near is not None:
            return near
    lo = torch.zeros_like(k)
    hi = torch.full_like(k, 0x7F800000)
    m = max(2, min(16, 256 // k.numel()))
    steps = torch.arange(1, m + 1)
    rows = torch.arange(k.numel())
    while bool((lo < hi).any()):
        width = (hi - lo + m) // m  # ceil((hi - lo + 1) / m): the last candidate reaches hi
        cand = torch.minimum(lo[:, None] + width[:, None] * steps, hi[:, None])
        values = cand.reshape(-1).to(torch.int32).view(torch.float32)
        count = torch.zeros(cand.numel(), dtype=torch.int64)
        for t in sorted_scores:
            count += t.numel() - torch.searchsorted(t, values.to(t.device)).cpu()
        ok = count.view_as(cand) >= k[:, None]  # true for a prefix of the candidates
        n_ok = ok.sum(1)
        new_lo = torch.where(n_ok > 0, cand[rows, (n_ok - 1).clamp(min=0)], lo)
        hi = torch.where(n_ok < m, cand[rows, n_ok.clamp(max=m - 1)] - 1, hi)
        lo = new_lo
    return lo.to(torch.int32).view(torch.float32)


def _close_ranks(sorted_scores: list[Tensor], k: Tensor) -> Tensor | None:
    """Thresholds for ranks close together: search the two extremes, sort what lies between.

    Only the entries between the two extreme thresholds are gathered (about ``max(k) - min(k)``
    of them); ``None`` when ties make that many more, or the ranks are spread too far.
    """
    hi_v, lo_v = topk_thresholds(sorted_scores, [int(k.min()), int(k.max())]).tolist()
    bounds = torch.tensor([lo_v, hi_v], dtype=torch.float32)
    above, inside, cuts = 0, 0, []
    for t in sorted_scores:
        a = int(torch.searchsorted(t, bounds[:1].to(t.device)))
        b = int(torch.searchsorted(t, bounds[1:].to(t.device), right=True))
        above += t.numel() - b
        inside += b - a
        cuts.append((a, b))
    if inside > 4 * (int(k.max()) - int(k.min()) + 1) + 4096:
        return None
    between = [t[a:b].cpu() for t, (a, b) in zip(sorted_scores, cuts, strict=True) if b > a]
    values = _sorted(torch.cat(between), descending=True)
    return values[k - above - 1]


@dataclass
class _Alloc:
    total: int
    entries: list[PlanEntry] = field(default_factory=list)
    tensors: dict[str, Tensor] = field(default_factory=dict)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)


def _struct_cost(kind: str, d_in: int, d_out: int, r: int) -> int:
    return r * (d_in + d_out) if kind == "lora" else 2 * d_out * r + r + d_out


def _totals_at(
    scores: dict[str, Tensor],
    sorted_scores: dict[str, Tensor],
    thr: Tensor,
    cfg: SPTConfig,
    extra: int,
) -> Tensor:
    """Plan totals for many thresholds at once (the counting part of :func:`_allocate_at`)."""
    totals = torch.full(thr.shape, extra, dtype=torch.int64)
    for name, s in scores.items():
        st = sorted_scores[name]
        c = st.numel() - torch.searchsorted(st, thr.to(st.device)).cpu()
        if s.dim() == 2:
            d_out, d_in = s.shape
            cost = _struct_cost(cfg.structured, d_in, d_out, cfg.r)
            totals += torch.where(c.double() >= cost / cfg.alpha, cost, c)
        else:
            totals += torch.where(c.double() >= s.numel() / cfg.beta, s.numel(), c)
    return totals


def _allocate_at(
    scores: dict[str, Tensor],
    sorted_scores: dict[str, Tensor],
    thr: float,
    cfg: SPTConfig,
    extra: int,
    materialise: bool,
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
            d_out, d_in = s.shape
            cost = _struct_cost(cfg.structured, d_in, d_out, cfg.r)
            if c >= cost / cfg.alpha:
                total += cost
                out.counts[name] = {"kind": 1, "count": c, "cost": cost}
                if materialise:
                    settings: dict[str, Any]
                    if cfg.structured == "lora":
                        settings = {
                            "r": cfg.r,
                            "alpha": float(cfg.lora_alpha or cfg.r),
                            "dropout": 0.0,
                            "bits": 32,
                            "criterion": "l1",
                        }
                    else:
                        settings = {
                            "dim": cfg.r, "placement": "sequential", "scale": 1.0, "activation": "gelu",
                            "bias": True, "dropout": 0.0, "bits": 32, "criterion": "l1", "read": None,
                        }  # fmt: skip
                    out.entries.append(PlanEntry(cfg.structured, module, settings))
                continue
            total += c
            out.counts[name] = {"kind": 0, "count": c, "cost": c}
        else:
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


def allocate(
    model: nn.Module,
    scores: dict[str, Tensor],
    cfg: SPTConfig,
    *,
    family: Family | None = None,
    head: list[str] | None = None,
) -> Plan:
    """Build the SPT plan whose trainable count (head excluded) is closest to the budget."""
    family = family or detect_family(model)
    head = (
        family.role_names(model, "head")
        if head is None and "head" in family.roles
        else (head or [])
    )
    base = sum(
        p.numel()
        for n, p in model.named_parameters()
        if not any(n.startswith(h + ".") for h in head)
    )
    budget = parse_budget(cfg.budget, base)
    cls = [n for n, _ in model.named_parameters() if re.search(r"(cls_token|temporal_token)$", n)]
    extra = sum(model.get_parameter(n).numel() for n in cls)
    pool = sum(s.numel() for s in scores.values())
    if budget > pool + extra:
        raise PlanError(f"budget {budget:,} exceeds the SPT pool of {pool + extra:,} parameters")
    sorted_scores = {n: _sorted(s) for n, s in scores.items()}
    ordered = list(sorted_scores.values())

    def totals_at(taus: list[int]) -> list[int]:
        thr = topk_thresholds(ordered, taus)
        return [int(v) for v in _totals_at(scores, sorted_scores, thr, cfg, extra)]

    def total_at(tau: int) -> int:
        return totals_at([tau])[0]

    # Coarse log grid, then bisection inside the bracket that crosses the budget.
    grid = sorted({max(1, min(pool, int(round(pool ** (i / 40))))) for i in range(41)})
    totals = list(zip(grid, totals_at(grid), strict=True))
    most = max(v for _, v in totals)
    if most < 0.99 * budget:
        raise PlanError(
            f"budget {budget:,} is more than SPT can allocate here: with every sensitive matrix "
            f"structured at r={cfg.r} and every vector tuned, the plan holds {most:,} parameters; "
            "raise r or lower the budget"
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
        alloc = _allocate_at(scores, sorted_scores, thr, cfg, extra, True)
        _top_up(alloc, scores, sorted_scores, thr, budget)
        allocs.append((abs(alloc.total - budget), tau, thr, alloc))
    _, tau, thr, alloc = min(allocs, key=lambda a: a[0])
    entries = alloc.entries + [PlanEntry("full", n, {"kind": "param"}) for n in cls]
    meta = {
        "spt": {
            "budget": budget,
            "total": alloc.total,
            "tau": tau,
            "threshold": thr,
            "structured": cfg.structured,
            "r": cfg.r,
            "alpha": cfg.alpha,
            "beta": cfg.beta,
            "pool": pool,
            "counts": alloc.counts,
        }
    }
    return Plan(
        entries=entries, head=list(head), family=family.name, tensors=alloc.tensors, meta=meta
    )


def allocate_from_config(model: nn.Module, data: Any, run_cfg: Any) -> Plan:
    """Sensitivity on the training data + allocation + apply, from a run config's ``allocation``."""
    import time

    from torch.utils.data import DataLoader

    from ..core import apply_plan

    spec = dict(run_cfg.allocation)
    method = spec.pop("method", "spt")
    if method != "spt":
        raise PlanError(f"allocation.method must be 'spt', got {method!r}")
    cfg = SPTConfig(**spec)
    g = torch.Generator().manual_seed(run_cfg.train.seed)
    loader = DataLoader(
        data.train, batch_size=cfg.batch_size, shuffle=True, generator=g, collate_fn=data.collate
    )
    t0 = time.perf_counter()
    scores = sensitivity(model, loader, n_batches=cfg.batches)
    t1 = time.perf_counter()
    plan = allocate(model, scores, cfg, head=run_cfg.head)
    plan.meta["spt"]["sensitivity_s"] = time.perf_counter() - t0  # scores + allocation
    plan.meta["spt"]["scores_s"] = t1 - t0
    apply_plan(model, plan)
    return plan


def plot_allocation(plan: Plan, model: nn.Module, out: str) -> None:
    """Heatmap of layers x roles: sparse counts (colour) and structured matrices (marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ..io import atomic_write

    family = detect_family(model)
    counts = plan.meta["spt"]["counts"]
    roles = [r for r in family.candidate_roles if r in family.roles]
    blocks = family.block_names(model)
    grid = np.zeros((len(blocks), len(roles)))
    marks: list[tuple[int, int, str]] = []
    for name, c in counts.items():
        module = name.rpartition(".")[0]
        for j, role in enumerate(roles):
            if module in family.role_names(model, role):
                i = next((k for k, b in enumerate(blocks) if module.startswith(b + ".")), None)
                if i is None:
                    continue
                if c["kind"] == 1:
                    marks.append((i, j, "L" if plan.meta["spt"]["structured"] == "lora" else "A"))
                else:
                    grid[i, j] = c["count"]
    fig, ax = plt.subplots(figsize=(1.1 * len(roles) + 2, 0.35 * len(blocks) + 1.5))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    for i, j, m in marks:
        ax.text(j, i, m, ha="center", va="center", color="red", fontweight="bold")
    ax.set_xticks(range(len(roles)), roles)
    ax.set_yticks(range(len(blocks)), [str(i) for i in range(len(blocks))])
    ax.set_xlabel("role")
    ax.set_ylabel("layer")
    fig.colorbar(im, ax=ax, label="sparse positions")
    s = plan.meta["spt"]
    ax.set_title(
        f"SPT-{s['structured']}: {s['total']:,} params (budget {s['budget']:,}); L/A = structured"
    )
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
