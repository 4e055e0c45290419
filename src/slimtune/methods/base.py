"""Shared pieces of the methods: the method registry, wrappers and module surgery."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

from torch import Tensor, nn

from ..errors import PlanError, TargetError
from ..families import Family
from ..plan import Plan

__all__ = [
    "MethodConfig",
    "Wrapper",
    "get_module",
    "set_module",
    "unwrap",
    "QuantizedWeights",
]


class Wrapper(nn.Module):
    """A module that wraps an original layer, kept as ``base_layer``.

    Subclasses add trainable parts and may implement :meth:`merge` / :meth:`unmerge` (fold the
    update into the base weights and back). ``enabled = False`` makes the wrapper return the
    base layer's output unchanged.
    """

    method: ClassVar[str] = ""
    mergeable: ClassVar[bool] = False

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.enabled = True
        self.merged = False

    @property
    def weight(self) -> Tensor:
        """The wrapped layer's weight (models read e.g. ``layer.weight.dtype``)."""
        return unwrap(self.base_layer).weight  # type: ignore[return-value]

    @property
    def bias(self) -> Tensor | None:
        """The wrapped layer's bias."""
        return unwrap(self.base_layer).bias  # type: ignore[return-value]

    def merge(self) -> None:
        """Fold the update into ``base_layer`` (no-op if already merged)."""
        raise PlanError(f"{type(self).__name__} cannot be merged into its base layer")

    def unmerge(self) -> None:
        """Undo :meth:`merge` (no-op if not merged)."""
        raise PlanError(f"{type(self).__name__} cannot be unmerged")


class QuantizedWeights:
    """Mixin for wrappers whose weight matrices may be trained and stored at low precision.

    After :func:`slimtune.load` restores a quantized matrix, the forward pass must use exactly
    the stored levels (re-quantizing de-quantized values would move mu and sigma). The restored
    value is used as is (gradients still flow to it) until the parameter is next modified in
    place (an optimizer step), which torch's version counter tells; then quantization resumes.
    """

    quantized_params: tuple[str, ...] = ()

    def freeze_quantized(
        self, name: str, param: Tensor, stored: tuple[Tensor, Tensor, Tensor]
    ) -> None:
        """Use ``param`` as is (it holds de-quantized ``stored = (codes, mu, sigma)``)."""
        pinned = self.__dict__.setdefault("_pinned", {})
        pinned[name] = (param._version, stored)

    def pinned(self, name: str, param: Tensor) -> Tensor | None:
        """``param`` itself while it still holds restored levels, else ``None``."""
        return param if self.stored_codes(name, param) is not None else None

    def stored_codes(self, name: str, param: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
        """The restored ``(codes, mu, sigma)`` of ``param`` if it was not modified since."""
        pinned = self.__dict__.get("_pinned", {})
        hit = pinned.get(name)
        if hit is None or hit[0] != param._version:
            pinned.pop(name, None)
            return None
        return hit[1]


def unwrap(module: nn.Module) -> nn.Module:
    """The innermost original layer under any number of wrappers."""
    while isinstance(module, Wrapper):
        module = module.base_layer
    return module


def get_module(model: nn.Module, name: str) -> nn.Module:
    """``model.get_submodule`` with an error that names the missing module."""
    try:
        return model.get_submodule(name)
    except AttributeError as exc:
        raise TargetError(f"model has no module named {name!r}") from exc


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule called ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


@dataclass
class MethodConfig:
    """Base of every method's configuration dataclass.

    Subclasses set ``name`` and implement :meth:`plan` (targets -> plan entries); the function
    that applies the entries is registered with
    :func:`~slimtune.methods.registry.register_method`.
    """

    name: ClassVar[str] = ""

    def plan(self, model: nn.Module, family: Family) -> Plan:
        """Resolve this configuration on ``model`` into plan entries."""
        raise NotImplementedError

    def settings(self, exclude: tuple[str, ...] = ("targets",)) -> dict[str, Any]:
        """This configuration's fields as a JSON-ready dict."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name in exclude:
                continue
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out
