"""Plans on disk: ``plan.json`` + ``plan.safetensors`` (the plan's index tensors)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import LoadError, PlanError
from ..plan import Plan
from .files import atomic_write, atomic_write_text

__all__ = ["save_plan", "load_plan"]


def save_plan(plan: Plan, path: str | os.PathLike[str]) -> Path:
    """Write a plan as ``plan.json`` + ``plan.safetensors`` (its index tensors)."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous().cpu() for k, v in plan.tensors.items()}
    atomic_write(
        out / "plan.safetensors",
        lambda tmp: save_file(tensors, tmp, metadata={"format": "slimtune-plan"}),
    )
    atomic_write_text(out / "plan.json", json.dumps(plan.to_dict(), indent=1))
    return out


def load_plan(path: str | os.PathLike[str]) -> Plan:
    """Read a plan written by :func:`save_plan`."""
    path = Path(path)
    try:
        data = json.loads((path / "plan.json").read_text(encoding="utf-8"))
        tensors = load_file(str(path / "plan.safetensors"))
    except (OSError, json.JSONDecodeError, SafetensorError) as exc:
        raise LoadError(f"{path}: cannot read plan ({exc})") from exc
    try:
        return Plan.from_dict(data, tensors)
    except PlanError as exc:
        raise LoadError(f"{path / 'plan.json'}: {exc}") from exc
