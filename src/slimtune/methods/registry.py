"""The method registry: one place that maps a method's name to its configuration class, the
function that applies its plan entries, and its place in the order of application.

A method registers itself where it is defined::

    @register_method(LoRA, order=3)
    def _inject(model: nn.Module, entry: PlanEntry, plan: Plan) -> None: ...

:func:`slimtune.apply_plan` applies entries in ``order`` (parameter-level methods first: they
address tensors by their original names, before wrappers rename them), and the application
builds run-config methods (``{name: lora, r: 8}``) through :func:`build_method`. A new method
needs nothing else: no list elsewhere names the methods.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import PlanError
from ..plan import Plan, PlanEntry
from .base import MethodConfig

__all__ = [
    "Injector",
    "MethodSpec",
    "METHODS",
    "register_method",
    "method_spec",
    "build_method",
    "config_methods",
]

Injector = Callable[[nn.Module, PlanEntry, Plan], None]
"""Applies one plan entry of a method to a model (wrapping or unfreezing its target)."""


@dataclass(frozen=True)
class MethodSpec:
    """One registered method.

    Attributes:
        name: the method's name in plans, manifests and run configs (``config.name``).
        config: its configuration dataclass.
        inject: applies one of its plan entries to a model.
        order: position in the order of application (lower first).
        in_run_config: whether a run config's ``methods`` list may name it (``sparse`` and
            ``head`` are planned by passes and ``head_bits`` instead).
    """

    name: str
    config: type[MethodConfig]
    inject: Injector
    order: int
    in_run_config: bool = True


METHODS: dict[str, MethodSpec] = {}
"""Every registered method by name."""


def register_method(
    config: type[MethodConfig], *, order: int, in_run_config: bool = True
) -> Callable[[Injector], Injector]:
    """Register ``config``'s method with the decorated injector (see the module docstring)."""
    if not config.name:
        raise PlanError(f"{config.__name__} has no method name (set its class attribute name)")

    def deco(fn: Injector) -> Injector:
        METHODS[config.name] = MethodSpec(config.name, config, fn, order, in_run_config)
        return fn

    return deco


def method_spec(name: str) -> MethodSpec:
    """The registered method ``name``.

    Raises:
        PlanError: no method of that name (the message lists the known ones).
    """
    spec = METHODS.get(name)
    if spec is None:
        raise PlanError(f"unknown method {name!r}; known: {sorted(METHODS)}")
    return spec


def config_methods() -> list[str]:
    """Names of the methods a run config's ``methods`` list may use, in order of application."""
    return [s.name for s in sorted(METHODS.values(), key=lambda s: s.order) if s.in_run_config]


def build_method(name: str, settings: Mapping[str, Any]) -> MethodConfig:
    """``build_method("lora", {"r": 8})`` -> ``LoRA(r=8)``.

    Raises:
        PlanError: unknown method, one a run config cannot build, or invalid settings.
    """
    spec = method_spec(name)
    if not spec.in_run_config:
        raise PlanError(f"method {name!r} cannot be built from settings; it is planned by a pass")
    try:
        return spec.config(**settings)
    except (TypeError, ValueError) as exc:  # PlanError is a ValueError too
        raise PlanError(f"{name}: {exc}") from exc
