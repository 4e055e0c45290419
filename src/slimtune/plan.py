"""Plans: plain data that says what :func:`slimtune.apply` does to a model.

A plan is a list of entries, one per target (a module name) with the method and its settings,
plus the names of the always-trainable head modules and any index tensors (sparse positions).
It is saved as JSON (``plan`` inside ``slimtune.json``) and safetensors (index tensors), so it
can be read, diffed, plotted and applied again: the same plan on the same backbone gives the
same model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .errors import PlanError

__all__ = ["PlanEntry", "Plan"]

PLAN_VERSION = 1


@dataclass
class PlanEntry:
    """One target and what to do with it.

    Attributes:
        method: registered method name (``lora``, ``adapter``, ``bitfit``, ``prompt``,
            ``sparse``, ``full``).
        target: module name in the base model (``encoder.layer.0.attention.self.query``).
        settings: the method's settings for this target (JSON-serialisable).
    """

    method: str
    target: str
    settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or not self.method:
            raise PlanError(f"plan entry method must be a non-empty string, got {self.method!r}")
        if not isinstance(self.target, str):
            raise PlanError(f"plan entry target must be a module name string, got {self.target!r}")


@dataclass
class Plan:
    """What to tune, where, and how.

    Attributes:
        entries: per-target entries, applied in order.
        head: module names whose parameters are always trainable (the task head).
        family: backbone family the plan was made for.
        tensors: index tensors referenced by entries (``settings["tensors"]`` keys).
        meta: free-form information (e.g. the SPT budget and threshold).
    """

    entries: list[PlanEntry] = field(default_factory=list)
    head: list[str] = field(default_factory=list)
    family: str = "generic"
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (index tensors are described, not inlined)."""
        return {
            "version": PLAN_VERSION,
            "family": self.family,
            "head": list(self.head),
            "entries": [asdict(e) for e in self.entries],
            "tensors": {
                k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in self.tensors.items()
            },
            "meta": self.meta,
        }

    @classmethod
    def from_dict(
        cls, data: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None
    ) -> Plan:
        """Rebuild a plan from :meth:`to_dict` output and its index tensors."""
        if not isinstance(data, dict) or "entries" not in data:
            raise PlanError("not a slimtune plan: expected an object with an 'entries' list")
        version = data.get("version", PLAN_VERSION)
        if version > PLAN_VERSION:
            raise PlanError(
                f"plan version {version} is newer than this slimtune supports ({PLAN_VERSION})"
            )
        tensors = dict(tensors or {})
        for key in data.get("tensors", {}):
            if key not in tensors:
                raise PlanError(f"plan refers to tensor {key!r}, which was not provided")
        entries = [PlanEntry(**e) for e in data["entries"]]
        return cls(
            entries=entries,
            head=list(data.get("head", [])),
            family=data.get("family", "generic"),
            tensors={k: tensors[k] for k in data.get("tensors", {})},
            meta=dict(data.get("meta", {})),
        )

    def methods(self) -> dict[str, int]:
        """Number of targets per method."""
        out: dict[str, int] = {}
        for e in self.entries:
            out[e.method] = out.get(e.method, 0) + 1
        return out

    def __str__(self) -> str:
        return json.dumps(self.to_dict(), indent=1)
