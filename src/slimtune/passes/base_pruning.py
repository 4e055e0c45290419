"""What pruning did to a base model, remembered on the model so that a task file can carry it.

A model pruned by Light-PEFT (:func:`slimtune.passes.lightpeft.prune`) keeps a
:class:`BasePruning` beside its slimtune state: the fingerprint of the *original* base, the
heads and FFN neurons each block kept (in the original's indexing) and the bias shifts that
compensation added. :func:`slimtune.save` writes it into the adapter directory, which then holds
everything that turns the original base into the task model and nothing of the base;
:func:`slimtune.load` checks the original base against the fingerprint and :func:`replay` s the
pruning on it before the methods are restored::

    original base --check fingerprint--> + bias shifts --shrink(kept heads, neurons)-->
        pruned base --check the adapter's own fingerprint--> methods and head restored

The record survives :func:`slimtune.remove` (it describes the base, not the methods), so a
pruned model can take another plan (the composition: prune, then allocate on the pruned model).
Pruning an already pruned model composes the two records (kept indices mapped back to the
original's).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import PlanError
from ..families import Family
from ..linear import dims, is_linear
from ..methods.base import unwrap
from .blocks import block_infos
from .shrink import shrink

__all__ = [
    "SHIFT_DTYPE",
    "BasePruning",
    "add_shifts",
    "check_shifts",
    "pruning_of",
    "record_pruning",
    "replay",
]

_ATTR = "_slimtune_pruning"

SHIFT_DTYPE = torch.float32
"""Compensation shifts are kept and stored in full precision: they change the frozen base the
adapter is trained on, and the task file must rebuild that base bit for bit. Rounding them to
float16 when they are made (tried) moves a tiny ViT's logits by up to 6e-4 relative, more than
the compensation tests allow; compensation is off by default (the paper's), so a task file
usually has no shifts at all."""


@dataclass
class BasePruning:
    """How a pruned base was made from its original.

    Attributes:
        base: :func:`slimtune.core.fingerprint` of the original base (task head excluded).
        family: the family the block names belong to.
        before: block name -> ``(heads, ffn)`` of the original, in block order.
        heads: block name -> kept query heads (indices into the original's heads).
        neurons: block name -> kept FFN neurons (indices into the original's neurons).
        bias_shift: linear name -> what compensation added to its bias (:data:`SHIFT_DTYPE`).
    """

    base: dict[str, Any]
    family: str
    before: dict[str, tuple[int, int]]
    heads: dict[str, list[int]]
    neurons: dict[str, list[int]]
    bias_shift: dict[str, Tensor] = field(default_factory=dict)

    def kept_fraction(self) -> dict[str, tuple[int, int]]:
        """Block name -> ``(kept heads, kept neurons)``."""
        return {b: (len(self.heads[b]), len(self.neurons[b])) for b in self.before}


def pruning_of(model: nn.Module) -> BasePruning | None:
    """The pruning record of ``model``, or ``None`` for a base that was never pruned."""
    rec = model.__dict__.get(_ATTR)
    return rec if isinstance(rec, BasePruning) else None


def remember(model: nn.Module, rec: BasePruning) -> None:
    """Attach a pruning record to a model that is pruned that way already."""
    model.__dict__[_ATTR] = rec


def record_pruning(
    model: nn.Module,
    *,
    base: Mapping[str, Any],
    family: Family,
    before: Mapping[str, Mapping[str, int]],
    heads: Mapping[str, Sequence[int]],
    neurons: Mapping[str, Sequence[int]],
    bias_shift: Mapping[str, Tensor],
) -> BasePruning:
    """Remember one pruning of ``model`` (call it with the decision that was just applied).

    ``heads``/``neurons`` index the model as it was before this pruning; ``base`` is its
    fingerprint then. An earlier record is composed with this one: indices are mapped back to
    the original and its fingerprint is kept.
    """
    names = [b.name for b in block_infos(model, family)]
    prev = pruning_of(model)
    if prev is None:
        full = {b: (int(before[b]["heads"]), int(before[b]["ffn"])) for b in names}
        prev = BasePruning(
            base=dict(base),
            family=family.name,
            before=full,
            heads={b: list(range(h)) for b, (h, _) in full.items()},
            neurons={b: list(range(f)) for b, (_, f) in full.items()},
        )
    check_shifts(model, bias_shift)

    def kept(
        given: Mapping[str, Sequence[int]], earlier: dict[str, list[int]], b: str
    ) -> list[int]:
        # shrink keeps the given indices sorted and once each: so does the record
        idx = sorted({int(i) for i in given[b]}) if b in given else range(len(earlier[b]))
        return [earlier[b][i] for i in idx]

    rec = BasePruning(
        base=prev.base,
        family=prev.family,
        before=prev.before,
        heads={b: kept(heads, prev.heads, b) for b in names},
        neurons={b: kept(neurons, prev.neurons, b) for b in names},
        bias_shift={
            **prev.bias_shift,
            **{k: v.detach().to("cpu", SHIFT_DTYPE) for k, v in bias_shift.items()},
        },
    )
    remember(model, rec)
    return rec


def check_shifts(model: nn.Module, names: Iterable[str]) -> None:
    """Refuse compensating a linear that an earlier pruning of ``model`` compensated already
    (call it before pruning changes anything)."""
    prev = pruning_of(model)
    both = sorted(set(prev.bias_shift if prev else ()) & set(names))
    if both:
        raise PlanError(
            f"{both[0]} was compensated by an earlier pruning already; compensate in one pruning "
            "only (compensate: false on the second)"
        )


def _shift_targets(model: nn.Module, shifts: Mapping[str, Tensor]) -> list[tuple[Tensor, Tensor]]:
    out = []
    for name, shift in shifts.items():
        try:
            lin = unwrap(model.get_submodule(name))
        except AttributeError as exc:
            raise PlanError(f"bias shift for {name}: the model has no such module") from exc
        bias = getattr(lin, "bias", None)
        if not is_linear(lin) or not isinstance(bias, Tensor):
            raise PlanError(f"bias shift for {name}, which is not a linear with a bias")
        if shift.numel() != dims(lin)[1]:
            raise PlanError(
                f"bias shift of {name} has {shift.numel()} values for {dims(lin)[1]} outputs"
            )
        out.append((bias, shift))
    return out


def add_shifts(model: nn.Module, shifts: Mapping[str, Tensor]) -> None:
    """Add compensation shifts (rounded to :data:`SHIFT_DTYPE`) to the named linears' biases.

    Every name is checked before any bias changes.
    """
    targets = _shift_targets(model, shifts)
    with torch.no_grad():
        for bias, shift in targets:
            bias.add_(shift.to(SHIFT_DTYPE).to(device=bias.device, dtype=bias.dtype))


def replay(model: nn.Module, rec: BasePruning, family: Family) -> nn.Module:
    """Prune an original base as ``rec`` says (shifts, then shrink) and remember ``rec`` on it.

    Raises:
        PlanError: another family, other blocks or block sizes than the record's original, or
            a model that is pruned already. Checked before anything changes.
    """
    if pruning_of(model) is not None:
        raise PlanError(
            "this model is pruned already: load a task file onto the original (unpruned) base"
        )
    if family.name != rec.family:
        raise PlanError(f"the task was pruned on a {rec.family} model, this one is {family.name}")
    have = {b.name: (b.num_heads, b.ffn) for b in block_infos(model, family)}
    if have != rec.before:
        raise PlanError(
            f"the task was pruned from blocks of (heads, FFN neurons) {list(rec.before.values())}, "
            f"this base has {list(have.values())}"
        )
    for b, (h, f) in rec.before.items():
        bad = [i for i in rec.heads[b] if not 0 <= i < h] + [
            i for i in rec.neurons[b] if not 0 <= i < f
        ]
        if bad or not rec.heads[b] or not rec.neurons[b]:
            raise PlanError(f"{b}: kept heads/neurons out of range or empty")
    _shift_targets(model, rec.bias_shift)
    add_shifts(model, rec.bias_shift)
    shrink(model, rec.heads, rec.neurons, family)
    remember(model, rec)
    return model
