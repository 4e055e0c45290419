"""What Light-PEFT removes: :class:`PruningDecision` and :func:`decide` (scores -> kept indices)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..blocks import BlockInfo
from .config import LightPEFTConfig

__all__ = ["PruningDecision", "decide"]


@dataclass
class PruningDecision:
    """What survives Light-PEFT pruning (plain data, JSON-ready through :meth:`to_dict`).

    Attributes:
        heads: block name -> kept head indices.
        neurons: block name -> kept FFN neuron indices.
        ranks: LoRA module name -> kept rank indices (modules not listed are removed).
        before: block name -> ``{"heads": n, "ffn": n}`` before pruning.
        lora_before: LoRA module name -> rank before pruning.
        scores: the masks and importance the decision came from (lists of floats).
        bias_shift: linear name -> what to add to its bias before shrinking (``compensate``:
            the removed heads' and neurons' mean contribution); empty: nothing.
    """

    heads: dict[str, list[int]]
    neurons: dict[str, list[int]]
    ranks: dict[str, list[int]]
    before: dict[str, dict[str, int]] = field(default_factory=dict)
    lora_before: dict[str, int] = field(default_factory=dict)
    scores: dict[str, Any] = field(default_factory=dict)
    bias_shift: dict[str, list[float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PruningDecision:
        return cls(**{k: data[k] for k in data if k in cls.__dataclass_fields__})


def _n_removed(ratio: float, n: int) -> int:
    return min(n, math.floor(ratio * n + 1e-9))


def _lowest(scores: Tensor, k: int) -> set[int]:
    """Indices of the ``k`` lowest scores (ties broken by index, deterministic)."""
    if k <= 0:
        return set()
    order = sorted(range(len(scores)), key=lambda i: (float(scores[i]), i))
    return set(order[:k])


def _kept_heads(b: BlockInfo, score: Tensor, config: LightPEFTConfig) -> list[int]:
    """Query heads a block keeps (see ``LightPEFTConfig.gqa`` for grouped-query attention)."""
    n, g = len(score), b.group_size
    if g == 1:
        drop = _lowest(score, min(_n_removed(config.head_ratio, n), n - 1))
    elif config.gqa == "groups":
        groups = score.reshape(b.kv_heads, g).sum(1)
        gone = _lowest(groups, min(_n_removed(config.head_ratio, b.kv_heads), b.kv_heads - 1))
        drop = {h for h in range(n) if h // g in gone}
    else:
        k = min(_n_removed(config.head_ratio, g), g - 1)
        drop = {
            grp * g + i
            for grp in range(b.kv_heads)
            for i in _lowest(score[grp * g : (grp + 1) * g], k)
        }
    return [i for i in range(n) if i not in drop]


def decide(
    blocks: list[BlockInfo],
    head_masks: list[Tensor],
    ffn_masks: list[Tensor],
    module_importance: Mapping[str, float],
    rank_importance: Mapping[str, Tensor],
    config: LightPEFTConfig,
) -> PruningDecision:
    """Choose the heads, neurons, LoRA modules and ranks to keep.

    The number removed is ``floor(ratio * n)`` of the ``n`` candidates with the lowest scores
    (ties by position): per block for heads (per key/value group or per group's query heads
    under grouped-query attention, ``config.gqa``), over all blocks for neurons, modules and
    ranks.
    A block always keeps its best head and its best neuron; the best rank overall survives.
    """
    heads: dict[str, list[int]] = {}
    neurons: dict[str, list[int]] = {}
    for b, m in zip(blocks, head_masks, strict=True):
        heads[b.name] = _kept_heads(b, m.abs(), config)
    flat = torch.cat([m.abs().float() for m in ffn_masks])
    drop_all = _lowest(flat, _n_removed(config.ffn_ratio, len(flat)))
    start = 0
    for b, m in zip(blocks, ffn_masks, strict=True):
        kept = [i for i in range(len(m)) if start + i not in drop_all]
        if not kept:  # never empty a block: keep its strongest neuron
            kept = [int(m.abs().argmax())]
        neurons[b.name] = kept
        start += len(m)
    names = list(module_importance)
    imp = torch.tensor([float(module_importance[n]) for n in names])
    drop_mod = _lowest(imp, min(_n_removed(config.module_ratio, len(names)), len(names) - 1))
    kept_mods = [n for i, n in enumerate(names) if i not in drop_mod]
    pairs = [(n, i) for n in kept_mods for i in range(len(rank_importance[n]))]
    rscores = torch.tensor([float(rank_importance[n][i]) for n, i in pairs])
    drop_rank = _lowest(rscores, min(_n_removed(config.rank_ratio, len(pairs)), len(pairs) - 1))
    ranks: dict[str, list[int]] = {}
    for j, (n, i) in enumerate(pairs):
        if j not in drop_rank:
            ranks.setdefault(n, []).append(i)
    return PruningDecision(
        heads=heads,
        neurons=neurons,
        ranks=ranks,
        before={b.name: {"heads": b.num_heads, "ffn": b.ffn} for b in blocks},
        lora_before={n: len(rank_importance[n]) for n in names},
        scores={
            "head_masks": [m.tolist() for m in head_masks],
            "module_importance": {n: float(module_importance[n]) for n in names},
            "rank_importance": {n: rank_importance[n].tolist() for n in names},
        },
    )
