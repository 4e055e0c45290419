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

__all__ = ["PlanEntry", "Plan", "SLOT", "index_template", "template_index", "fill", "is_index"]

PLAN_VERSION = 2
"""Version 2 plans may hold groups of entries (:meth:`Plan.to_dict` with ``compact=True``);
plans without groups are written as version 1."""
SLOT = "{}"
"""The place of the varying integer in a name template (``encoder.layer.{}.mlp``)."""


def is_index(s: str) -> bool:
    """A non-negative integer written without sign or leading zeros."""
    return s.isascii() and s.isdigit() and (s == "0" or s[0] != "0")


def index_template(a: str, b: str) -> tuple[str, int, int] | None:
    """``(template, i, j)`` when ``a`` and ``b`` differ only in one integer (``i`` in ``a``).

    ``index_template("blocks.3.mlp", "blocks.12.mlp") == ("blocks.{}.mlp", 3, 12)``. ``None``
    when they differ otherwise, or when either already contains :data:`SLOT`.
    """
    if a == b or SLOT in a or SLOT in b:
        return None
    n = min(len(a), len(b))
    p = 0
    while p < n and a[p] == b[p]:
        p += 1
    while p > 0 and a[p - 1].isdigit():
        p -= 1
    s = 0
    while s < n - p and a[-1 - s] == b[-1 - s]:
        s += 1
    while s > 0 and a[len(a) - s].isdigit():
        s -= 1
    mid_a, mid_b = a[p : len(a) - s], b[p : len(b) - s]
    if not (is_index(mid_a) and is_index(mid_b)):
        return None
    return a[:p] + SLOT + a[len(a) - s :], int(mid_a), int(mid_b)


def template_index(template: str, name: str) -> int | None:
    """The integer ``i`` with ``fill(template, i) == name``, or ``None``."""
    pre, _, post = template.partition(SLOT)
    if len(name) < len(pre) + len(post) or not (name.startswith(pre) and name.endswith(post)):
        return None
    mid = name[len(pre) : len(name) - len(post)]
    return int(mid) if is_index(mid) else None


def fill(value: Any, i: int) -> Any:
    """``value`` with :data:`SLOT` replaced by ``i`` in every string in it (dicts/lists too)."""
    if isinstance(value, str):
        return value.replace(SLOT, str(i))
    if isinstance(value, dict):
        return {k: fill(v, i) for k, v in value.items()}
    if isinstance(value, list):
        return [fill(v, i) for v in value]
    return value


def _dump(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _has_slot(value: Any) -> bool:
    return SLOT in _dump(value)


def _pattern(a: Any, i: int, b: Any, j: int) -> tuple[bool, Any]:
    """``(True, p)`` with ``fill(p, i) == a`` and ``fill(p, j) == b``, or ``(False, None)``."""
    if _dump(a) == _dump(b):
        return (False, None) if _has_slot(a) else (True, a)
    if isinstance(a, str) and isinstance(b, str):
        if SLOT in a:
            return False, None
        x = str(i)
        start = a.find(x)
        while start >= 0:
            end = start + len(x)
            bounded = (start == 0 or not a[start - 1].isdigit()) and (
                end == len(a) or not a[end].isdigit()
            )
            t = a[:start] + SLOT + a[end:]
            if bounded and t.replace(SLOT, str(j)) == b:
                return True, t
            start = a.find(x, start + 1)
        return False, None
    if isinstance(a, dict) and isinstance(b, dict) and list(a) == list(b):
        out = {}
        for k in a:
            ok, out[k] = _pattern(a[k], i, b[k], j)
            if not ok:
                return False, None
        return True, out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        items = []
        for x, y in zip(a, b, strict=True):
            ok, v = _pattern(x, i, y, j)
            if not ok:
                return False, None
            items.append(v)
        return True, items
    return False, None


MAX_PERIOD = 16
"""Entries per index that a group may take in turn (LoRA on q and v: 2)."""


def _group_at(entries: list[PlanEntry], k: int, period: int) -> tuple[dict[str, Any], int] | None:
    """The group of entries from ``k`` on, ``period`` per index, and how many it covers."""
    first, second = entries[k : k + period], entries[k + period : k + 2 * period]
    if len(second) < period or any(e.method != first[0].method for e in first + second):
        return None
    templates: list[str] = []
    patterns: list[Any] = []
    x = None
    for a, b in zip(first, second, strict=True):
        t = index_template(a.target, b.target)
        if t is None or (x is not None and (t[1], t[2]) != x):
            return None
        x = (t[1], t[2])
        ok, pattern = _pattern(a.settings, x[0], b.settings, x[1])
        if not ok:
            return None
        templates.append(t[0])
        patterns.append(pattern)
    assert x is not None
    each = [x[0], x[1]]
    end = k + 2 * period
    while end + period <= len(entries):
        block = entries[end : end + period]
        i = template_index(templates[0], block[0].target)
        if i is None or any(
            e.method != first[0].method
            or fill(t, i) != e.target
            or _dump(fill(pattern, i)) != _dump(e.settings)
            for e, t, pattern in zip(block, templates, patterns, strict=True)
        ):
            break
        each.append(i)
        end += period
    shared = all(_dump(pattern) == _dump(patterns[0]) for pattern in patterns)
    group = {
        "method": first[0].method,
        "targets": templates[0] if period == 1 else templates,
        "each": each,
        "settings": patterns[0] if shared else patterns,
    }
    return group, end - k


def _group_entries(entries: list[PlanEntry]) -> list[dict[str, Any]]:
    """Runs of entries of one method whose targets and settings differ only in an integer (the
    block index) become one group, see :meth:`Plan.to_dict`; the period (entries per index)
    that covers the most entries is used."""
    out: list[dict[str, Any]] = []
    k = 0
    while k < len(entries):
        found = [_group_at(entries, k, p) for p in range(1, MAX_PERIOD + 1)]
        best = max((f for f in found if f), key=lambda f: f[1], default=None)
        if best is None:
            out.append(asdict(entries[k]))
            k += 1
        else:
            out.append(best[0])
            k += best[1]
    return out


def _names(key: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PlanError(f"plan {key!r} must be a list of module names, got {value!r}")
    return list(value)


def _expand_group(group: dict[str, Any]) -> list[PlanEntry]:
    if set(group) != {"method", "targets", "each", "settings"}:
        raise PlanError(
            "plan entry group must have exactly 'method', 'targets', 'each' and 'settings', got "
            f"{sorted(group)}"
        )
    targets, each, settings = group["targets"], group["each"], group["settings"]
    templates = [targets] if isinstance(targets, str) else targets
    if (
        not isinstance(templates, list)
        or not templates
        or not all(isinstance(t, str) and t.count(SLOT) == 1 for t in templates)
    ):
        raise PlanError(
            f"plan entry group 'targets' must be a name with one {SLOT!r} (or a list of them), "
            f"got {targets!r}"
        )
    if not isinstance(each, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in each
    ):
        raise PlanError(f"plan entry group 'each' must be a list of integers >= 0, got {each!r}")
    per_target = settings if isinstance(settings, list) else [settings] * len(templates)
    if len(per_target) != len(templates) or not all(isinstance(x, dict) for x in per_target):
        raise PlanError(
            f"plan entry group 'settings' must be an object (or one per target), got {settings!r}"
        )
    return [
        PlanEntry(group["method"], fill(t, i), fill(x, i))
        for i in each
        for t, x in zip(templates, per_target, strict=True)
    ]


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

    def to_dict(self, compact: bool = False) -> dict[str, Any]:
        """JSON-ready form (index tensors are described, not inlined).

        With ``compact=True``, consecutive entries of one method whose targets and settings
        differ only in one integer (the block index) are written as one group::

            {"method": "adapter", "targets": "encoder.layer.{}.mlp", "each": [0, 1, 2],
             "settings": {"dim": 32, "read": "encoder.layer.{}.norm2"}}

        ``"targets"`` may list several templates taken in turn for each index (LoRA on q and v:
        ``["layer.{}.q", "layer.{}.v"]``), with one ``"settings"`` for all or a list of one per
        template. This is version 2; :meth:`from_dict` reads both forms back to the same
        entries, in the same order.
        """
        entries: list[dict[str, Any]] = [asdict(e) for e in self.entries]
        if compact:
            grouped = _group_entries(self.entries)
            back = [asdict(e) for g in grouped for e in _expand_entry(g)]
            if _dump(back) == _dump(entries) and len(grouped) < len(entries):
                entries = grouped
        return {
            "version": 2 if any("targets" in e for e in entries) else 1,
            "family": self.family,
            "head": list(self.head),
            "entries": entries,
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
        if not isinstance(data["entries"], list):
            raise PlanError("not a slimtune plan: 'entries' must be a list")
        entries = [e for item in data["entries"] for e in _expand_entry(item)]
        return cls(
            entries=entries,
            head=_names("head", data.get("head", [])),
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


def _expand_entry(item: Any) -> list[PlanEntry]:
    """A plan dict's entry (or group of entries, see :meth:`Plan.to_dict`) as entries."""
    if not isinstance(item, dict):
        raise PlanError(f"plan entry must be an object, got {item!r}")
    if "targets" in item:
        return _expand_group(item)
    if not {"method", "target"} <= set(item) <= {"method", "target", "settings"}:
        raise PlanError(
            f"plan entry must have 'method', 'target' and 'settings', got {sorted(item)}"
        )
    return [PlanEntry(**item)]
