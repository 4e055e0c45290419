"""SPT step 2: the top-``tau`` threshold over all candidate scores without concatenating them."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ...errors import PlanError

__all__ = ["topk_threshold", "topk_thresholds"]


def sorted_scores_of(x: Tensor, descending: bool = False) -> Tensor:
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
    values = sorted_scores_of(torch.cat(between), descending=True)
    return values[k - above - 1]
