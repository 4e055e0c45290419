"""Bi-Head: the task head's weight matrix trained and stored at low precision.

::

    logits = x · Q(W)^T (+ b)          Q: per-matrix standardise, round to N(0, 1) levels,
                                          de-standardise (straight-through in the backward)

The head stays the model's own ``nn.Linear`` (kept as ``base_layer``); the wrapper only makes its
forward pass read the quantized weight. Without ``bias`` (the paper's Bi-Head) the layer's bias
is frozen and ignored, so the head is one low-bit matrix. Plan entries for it are made by
:func:`slimtune.apply` with ``head_bits < 32``; :class:`Head` builds the same entries explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import PlanError
from ..families import Family, resolve_modules
from ..plan import Plan, PlanEntry
from ..quant import QuantSpec, quantize
from .base import MethodConfig, QuantizedWeights, Wrapper, get_module, set_module, unwrap
from .registry import register_method

__all__ = ["Head", "QuantizedHead", "head_entries"]


@dataclass
class Head(MethodConfig):
    """A low-precision task head (Bi-Head).

    Attributes:
        bits: weight precision of the head's matrix (1, 2, 4 or 8).
        criterion: quantization levels criterion (``l1`` or ``mse``).
        bias: keep (and train) the head's bias in float32; ``False`` drops it from the forward.
        targets: roles or regexes of the head's linear layers (default: the family's ``head``).
    """

    name = "head"
    bits: int = 1
    criterion: str = "l1"
    bias: bool = False
    targets: tuple[str, ...] | list[str] | None = None

    def __post_init__(self) -> None:
        QuantSpec(self.bits, self.criterion)
        if self.bits >= 32:
            raise PlanError(
                "Head(bits=32) is a plain trainable head: leave it out, or use bits 1, 2, 4 or 8"
            )
        if isinstance(self.targets, str):
            self.targets = (self.targets,)
        if self.targets is not None:
            self.targets = tuple(self.targets)

    def plan(self, model: nn.Module, family: Family) -> Plan:
        targets = self.targets or ("head",)
        if self.targets is None and "head" not in family.roles:
            raise PlanError(
                f"the {family.name} family names no head: give Head(targets=[...]) explicitly"
            )
        names = resolve_modules(model, family, targets, kinds=(nn.Linear,), what="head target")
        return Plan(entries=head_entries(names, self.bits, self.criterion, self.bias), head=names)


def head_entries(
    names: list[str], bits: int, criterion: str = "l1", bias: bool = False
) -> list[PlanEntry]:
    """Plan entries that quantize the head linears ``names`` (see :class:`Head`)."""
    settings = {"bits": int(bits), "criterion": criterion, "bias": bool(bias)}
    return [PlanEntry("head", n, dict(settings)) for n in names]


class QuantizedHead(QuantizedWeights, Wrapper):
    """An ``nn.Linear`` head whose forward pass uses its quantized weight (see module docstring)."""

    method = "head"
    mergeable = True
    quantized_params = ("base_layer.weight",)

    base_layer: nn.Linear  # checked in __init__

    def __init__(
        self, base_layer: nn.Module, bits: int = 1, criterion: str = "l1", bias: bool = False
    ) -> None:
        super().__init__(base_layer)
        linear = unwrap(base_layer)
        if not isinstance(linear, nn.Linear) or linear is not base_layer:
            raise PlanError(
                f"a quantized head needs a plain nn.Linear, got {type(base_layer).__name__}"
            )
        self.quant = QuantSpec(bits, criterion)
        if self.quant.bits >= 32:
            raise PlanError("a quantized head needs bits 1, 2, 4 or 8, got 32")
        self.use_bias = bool(bias) and linear.bias is not None
        if linear.bias is not None and not self.use_bias:
            linear.bias.requires_grad_(False)
        w = linear.weight
        if w.requires_grad and float(w.detach().std()) == 0.0:
            # A constant matrix has no spread to standardise (see the up-projections).
            nn.init.trunc_normal_(w.data, std=1e-3, a=-2e-3, b=2e-3)

    def quantized_weight(self) -> Tensor:
        """The weight as used in the forward pass."""
        w = self.base_layer.weight
        pinned = self.pinned("base_layer.weight", w)
        return quantize(w, self.quant) if pinned is None else pinned

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled or self.merged:
            return self.base_layer(x)
        bias = self.base_layer.bias if self.use_bias else None
        return F.linear(x, self.quantized_weight(), bias)

    @torch.no_grad()
    def merge(self) -> None:
        """Write the quantized weight (and a zero bias if it is dropped) into the linear."""
        if self.merged:
            return
        lin = self.base_layer
        stored = self.stored_codes("base_layer.weight", lin.weight)
        q = self.quantized_weight().detach().clone()
        bias = None if lin.bias is None else lin.bias.detach().clone()
        self.__dict__["_float"] = (lin.weight.detach().clone(), bias, stored)
        lin.weight.copy_(q)
        if lin.bias is not None and not self.use_bias:
            lin.bias.zero_()
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Give the linear back its float weight (and bias)."""
        if not self.merged:
            return
        lin = self.base_layer
        weight, bias, stored = self.__dict__.pop("_float")
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
        if stored is not None:
            self.freeze_quantized("base_layer.weight", lin.weight, stored)
        self.merged = False

    def extra_repr(self) -> str:
        return f"bits={self.quant.bits}, criterion={self.quant.criterion}, bias={self.use_bias}"


@register_method(Head, order=6, in_run_config=False)
def inject_head(model: nn.Module, entry: PlanEntry, plan: Plan) -> None:
    s = entry.settings
    if not any(entry.target == h or entry.target.startswith(h + ".") for h in plan.head):
        raise PlanError(
            f"quantized head {entry.target!r} is not inside the plan's head modules {plan.head}"
        )
    layer = QuantizedHead(
        get_module(model, entry.target),
        bits=int(s.get("bits", 1)),
        criterion=str(s.get("criterion", "l1")),
        bias=bool(s.get("bias", False)),
    )
    set_module(model, entry.target, layer)
