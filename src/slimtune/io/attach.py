"""Apply a plan, then fill its tensors: all or nothing (shared by every way in)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

from ..core import apply_plan, remove
from ..errors import LoadError
from ..plan import Plan

__all__ = ["apply_and_fill"]


def apply_and_fill(model: nn.Module, plan: Plan, fill: Callable[[], None], path: Path) -> nn.Module:
    """``apply_plan(model, plan)`` then ``fill()``; on any error the model is given back as it
    was (methods removed, ``requires_grad`` flags restored) and the error propagates
    (a failure to apply becomes a :class:`LoadError` naming ``path``)."""
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        apply_plan(model, plan)
    except Exception as exc:
        raise LoadError(f"{path}: cannot apply the saved plan to this model ({exc})") from exc
    try:
        fill()
    except BaseException:
        remove(model)
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, p.requires_grad))
        raise
    return model
