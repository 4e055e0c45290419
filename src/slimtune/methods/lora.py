"""LoRA: low-rank updates of frozen linear layers (Hu et al., 2021).

::

    x ──► W (frozen) ───────────────┐
    │                               + ──► y = W x + b + (alpha / r) · B A dropout(x)
    └──► dropout ─► A (r×in) ─► B (out×r) ┘

``A`` is Kaiming-uniform, ``B`` starts at zero, so a fresh LoRA leaves the model unchanged.
``merge`` folds ``(alpha/r) B A`` into ``W``; ``unmerge`` takes it out again.

Speed: the forward and backward of base and update are fused in one autograd function working
on 2-D views, and no ``[tokens, out]`` temporary is created beyond what the frozen layer itself
needs. Without dropout (and with more tokens than a weight has columns, roughly), the update is
folded into a temporary weight ``W' = W + s B A`` for the call: the frozen GEMMs then carry it
(``y = x W'^T + b``, ``dx = g W'``), and only skinny products remain (``x A^T``, ``g B``,
``dA = s (g B)^T x``, ``dB = s g^T (x A^T)``). This is the same function (only float rounding
differs, as between any two GEMM orders) and is used for 32/64-bit floats only. With dropout the
update is added in place (``addmm_``); the mask is a ``bool`` tensor of dropped positions
(applied with ``masked_fill``, no float mask) and ``1 / (1 - p)`` is folded into the scaling.
On CPU the mask is drawn from 16 random bits per position (:func:`slimtune.dropout.drop_mask`), a quarter of the
generator calls of ``torch.rand``, which dominates the cost of dropout there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..dropout import drop_mask
from ..errors import PlanError
from ..families import Family, resolve_modules
from ..plan import Plan, PlanEntry
from ..quant import QuantSpec
from .base import MethodConfig, get_module, set_module, unwrap
from .lora_base import LoRALayer
from .lora_conv import LoRAConv2d
from .registry import register_method

__all__ = ["LoRA", "LoRALinear", "drop_mask"]


@dataclass
class LoRA(MethodConfig):
    """Low-rank adaptation of linear layers.

    Attributes:
        r: rank of the update (>= 1).
        alpha: scaling numerator; the update is multiplied by ``alpha / r``.
        dropout: dropout probability on the LoRA branch's input.
        targets: roles (``q``, ``v``, ...) or regular expressions of nn.Linear or nn.Conv2d
            modules (convolutions get :class:`~slimtune.methods.lora_conv.LoRAConv2d`).
        bits: weight precision of A and B during training and in storage (1, 2, 4, 8 or 32).
        criterion: quantization levels criterion for ``bits < 32`` (``l1`` or ``mse``).
    """

    name = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] | list[str] = ("q", "v")
    bits: int = 32
    criterion: str = "l1"

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise PlanError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise PlanError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.targets, str):
            self.targets = (self.targets,)
        if not self.targets:
            raise PlanError("LoRA needs at least one target (a role like 'q' or a regex)")
        self.targets = tuple(self.targets)
        QuantSpec(bits=self.bits, criterion=self.criterion)  # validates

    def plan(self, model: nn.Module, family: Family) -> Plan:
        names = resolve_modules(
            model, family, self.targets, kinds=(nn.Linear, nn.Conv2d), what="LoRA target"
        )
        return Plan(entries=[PlanEntry("lora", n, self.settings()) for n in names])


def _fold_pays(tokens: int, in_features: int, out_features: int, dtype: torch.dtype) -> bool:
    """Whether to fold ``s B A`` into a temporary weight for this call (see module docstring).

    Folding costs one ``[out, in]`` matrix; keeping the update separate costs two extra passes
    over ``[tokens, out]`` (forward) and ``[tokens, in]`` (backward). Only for 32/64-bit floats:
    in 16-bit formats ``W + s B A`` would round away most of a small update.
    """
    if dtype not in (torch.float32, torch.float64):
        return False
    return tokens * (in_features + out_features) > in_features * out_features


class _LoRAFunction(torch.autograd.Function):
    """y = x W^T + b + s (drop(x) A^T) B^T with a fused backward (base weight frozen).

    Without dropout and with enough tokens, the update is folded into a temporary weight
    ``W' = W + s B A`` (``y = x W'^T + b``, ``dx = g W'``), so the frozen layer's own GEMMs carry
    it; ``dA = s (g B)^T x`` and ``dB = s g^T (x A^T)`` need only skinny products. Otherwise the
    update is added in place (``addmm_``). The dropout mask is a ``bool`` tensor of the dropped
    positions (applied with ``masked_fill``), and ``1 / (1 - p)`` is folded into the scaling.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        lora_a: Tensor,
        lora_b: Tensor,
        scaling: float,
        drop_mask: Tensor | None,
        keep_scale: float,
    ) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        s = scaling * keep_scale if drop_mask is not None else scaling
        fold = drop_mask is None and _fold_pays(x2.shape[0], x2.shape[1], weight.shape[0], x.dtype)
        if fold:
            w = torch.addmm(weight, lora_b, lora_a, alpha=s)
            y = torch.addmm(bias, x2, w.t()) if bias is not None else x2 @ w.t()
            xd = x2
            u = xd @ lora_a.t()
        else:
            xd = x2 if drop_mask is None else x2.masked_fill(drop_mask.reshape(x2.shape), 0.0)
            u = xd @ lora_a.t()
            y = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
            y.addmm_(u, lora_b.t(), alpha=s)
        ctx.save_for_backward(xd, u, weight, lora_a, lora_b, drop_mask)
        ctx.scaling = s
        ctx.fold = fold
        ctx.has_bias = bias is not None
        return y.reshape(*shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        xd, u, weight, lora_a, lora_b, drop_mask = ctx.saved_tensors
        s = ctx.scaling
        g2 = grad.reshape(-1, grad.shape[-1])
        gb = g2 @ lora_b  # [N, r]
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            if ctx.fold:
                grad_x = g2 @ torch.addmm(weight, lora_b, lora_a, alpha=s)
            else:
                grad_x = g2 @ weight
                if drop_mask is None:
                    grad_x.addmm_(gb, lora_a, alpha=s)
                else:
                    upd = (gb @ lora_a).masked_fill_(drop_mask.reshape(grad_x.shape), 0.0)
                    grad_x.add_(upd, alpha=s)
            grad_x = grad_x.reshape(*grad.shape[:-1], weight.shape[1])
        grad_a = (gb.t() @ xd).mul_(s) if ctx.needs_input_grad[3] else None
        grad_b = (g2.t() @ u).mul_(s) if ctx.needs_input_grad[4] else None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = g2.sum(0)
        return grad_x, None, grad_bias, grad_a, grad_b, None, None, None


class LoRALinear(LoRALayer):
    """An nn.Linear with a LoRA update (see module docstring)."""

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        bits: int = 32,
        criterion: str = "l1",
    ) -> None:
        linear = unwrap(base_layer)
        if not isinstance(linear, nn.Linear):
            raise PlanError(f"LoRA needs an nn.Linear, got {type(linear).__name__}")
        a_shape = (r, linear.in_features)
        b_shape = (linear.out_features, r)
        super().__init__(base_layer, r, alpha, dropout, bits, criterion, a_shape, b_shape)

    @property
    def in_features(self) -> int:
        return self.lora_A.shape[1]

    @property
    def out_features(self) -> int:
        return self.lora_B.shape[0]

    def delta_weight(self) -> Tensor:
        """The dense update ``s B A`` (out x in)."""
        a, b = self.weights()
        return (b @ a) * self.scaling

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled or self.merged:
            return self.base_layer(x)
        a, b = self.weights()
        base = self.base_layer
        fused = (
            isinstance(base, nn.Linear)
            and not base.weight.requires_grad
            and x.dtype == a.dtype == base.weight.dtype
            and not torch.is_autocast_enabled(x.device.type)
        )
        if fused:
            drop = None
            keep_scale = 1.0
            if self.training and self.dropout > 0:
                # The dropped positions (bool); ``1 / (1 - p)`` goes into the scaling.
                drop = drop_mask(x.shape, self.dropout, x.device)
                keep_scale = 1.0 / (1.0 - self.dropout)
            return _LoRAFunction.apply(
                x, base.weight, base.bias, a, b, self.scaling, drop, keep_scale
            )
        # General path: wrapped/trainable base weights or mixed precision (autocast).
        h = F.dropout(x, self.dropout, self.training) if self.dropout > 0 else x
        return (
            self.base_layer(x) + F.linear(F.linear(h, a.to(h.dtype)), b.to(h.dtype)) * self.scaling
        )


@register_method(LoRA, order=3)
def inject_lora(model: nn.Module, entry: PlanEntry, plan: Plan) -> None:
    s = entry.settings
    module = get_module(model, entry.target)
    kind = LoRAConv2d if isinstance(unwrap(module), nn.Conv2d) else LoRALinear
    wrapped = kind(
        module,
        r=int(s["r"]),
        alpha=float(s["alpha"]),
        dropout=float(s.get("dropout", 0.0)),
        bits=int(s.get("bits", 32)),
        criterion=str(s.get("criterion", "l1")),
    )
    set_module(model, entry.target, wrapped)
