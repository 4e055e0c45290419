"""Methods that train existing tensors: BitFit (biases), Full (given tensors) and the task head.

They wrap nothing: they only choose which parameters of the frozen model receive gradients.
``BitFit(add_missing=True)`` gives bias-less linears a zero bias first, so it too leaves the
model's output unchanged at initialisation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import PlanError, TargetError
from ..families import Family, resolve_modules
from ..linear import float_dtype
from ..plan import Plan, PlanEntry
from .base import MethodConfig, get_module, unwrap
from .registry import register_method

__all__ = ["BitFit", "Full"]


@dataclass
class BitFit(MethodConfig):
    """Train bias terms only (Ben Zaken et al., 2022).

    Attributes:
        targets: roles or regexes of modules whose biases are trained; ``None`` = every bias
            outside the embeddings.
        add_missing: give bias-less nn.Linear targets a zero-initialised trainable bias.
    """

    name = "bitfit"
    targets: tuple[str, ...] | list[str] | None = None
    add_missing: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = (self.targets,)
        if self.targets is not None:
            self.targets = tuple(self.targets)

    def plan(self, model: nn.Module, family: Family) -> Plan:
        if self.targets is None:
            frozen = _frozen_prefixes(model, family)
            names = [
                n
                for n, m in model.named_modules()
                if n
                and not any(n == f or n.startswith(f + ".") for f in frozen)
                and (
                    isinstance(getattr(m, "bias", None), nn.Parameter)
                    or (self.add_missing and isinstance(m, nn.Linear))
                )
            ]
        else:
            names = resolve_modules(model, family, self.targets, what="BitFit target")
        entries = []
        for n in names:
            m = unwrap(get_module(model, n))
            has = isinstance(getattr(m, "bias", None), nn.Parameter)
            if has or (self.add_missing and isinstance(m, nn.Linear)):
                entries.append(PlanEntry("bitfit", n, {"add": not has}))
        if not entries:
            raise TargetError(
                "BitFit found no bias to train (set add_missing=True to add zero biases to linears)"
            )
        return Plan(entries=entries)


def _frozen_prefixes(model: nn.Module, family: Family) -> list[str]:
    out: list[str] = []
    for role in family.frozen_roles:
        if role in family.roles:
            out += family.role_names(model, role)
    return out


@register_method(BitFit, order=1)
def inject_bitfit(model: nn.Module, entry: PlanEntry, plan: Plan) -> None:
    m = unwrap(get_module(model, entry.target))
    if entry.settings.get("add") and getattr(m, "bias", None) is None:
        if not isinstance(m, nn.Linear):
            raise PlanError(
                f"can only add a bias to nn.Linear, {entry.target!r} is {type(m).__name__}"
            )
        m.bias = nn.Parameter(
            torch.zeros(m.out_features, device=m.weight.device, dtype=float_dtype(m))
        )
        state = getattr(model, "_slimtune", None)
        if state is not None:
            state.added_biases.append(entry.target)
    bias = getattr(m, "bias", None)
    if not isinstance(bias, nn.Parameter):
        raise PlanError(f"module {entry.target!r} has no bias for BitFit")
    bias.requires_grad_(True)


@dataclass
class Full(MethodConfig):
    """Unfreeze whole tensors.

    Attributes:
        targets: roles or module regexes (all their parameters), or parameter-name regexes
            prefixed with ``param:`` (``param:.*cls_token``).
    """

    name = "full"
    targets: tuple[str, ...] | list[str] = ()

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = (self.targets,)
        self.targets = tuple(self.targets)
        if not self.targets:
            raise PlanError("Full needs targets (roles, module regexes or 'param:<regex>')")

    def plan(self, model: nn.Module, family: Family) -> Plan:
        params = [t[len("param:") :] for t in self.targets if t.startswith("param:")]
        modules = [t for t in self.targets if not t.startswith("param:")]
        entries = (
            [
                PlanEntry("full", n, {"kind": "module"})
                for n in resolve_modules(model, family, modules)
            ]
            if modules
            else []
        )
        names = [n for n, _ in model.named_parameters()]
        for pat in params:
            rx = re.compile(rf"(?:.*\.)?(?:{pat})")
            hits = [n for n in names if rx.fullmatch(n)]
            if not hits:
                raise TargetError(
                    f"Full target 'param:{pat}' matches no parameter; parameters: {', '.join(names[:30])} ..."
                )
            entries += [PlanEntry("full", n, {"kind": "param"}) for n in hits]
        return Plan(entries=entries)


def _trainable(p: nn.Parameter, name: str) -> None:
    if not p.is_floating_point():
        raise PlanError(
            f"Full: {name} holds {p.dtype} codes of a quantized base and cannot be trained; "
            "use LoRA there, or leave the base unquantized"
        )
    p.requires_grad_(True)


@register_method(Full, order=0)
def inject_full(model: nn.Module, entry: PlanEntry, plan: Plan) -> None:
    if entry.settings.get("kind") == "param":
        try:
            p = model.get_parameter(entry.target)
        except AttributeError as exc:
            raise PlanError(f"model has no parameter {entry.target!r}") from exc
        _trainable(p, entry.target)
        return
    for n, p in get_module(model, entry.target).named_parameters():
        _trainable(p, f"{entry.target}.{n}")
