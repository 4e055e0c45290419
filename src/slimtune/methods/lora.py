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

GPT-2's ``Conv1D`` (weight stored ``[in, out]``) takes LoRA like an ``nn.Linear`` (the same
``A``/``B`` shapes; ``merge`` adds ``ΔW^T``). On a fused ``qkv`` linear, LoRA on some of its
parts (``targets=["q", "v"]`` on GPT-2's ``c_attn``) updates only those output rows: ``B`` has
the rows of the chosen parts, the parts share ``A``, and the other rows of ``ΔW`` are zero.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..dropout import drop_mask
from ..errors import PlanError, finite
from ..families import Family, resolve_modules
from ..linear import dims, linear_types, weight_oi
from ..plan import Plan, PlanEntry
from ..quant import QuantSpec
from .base import MethodConfig, get_module, set_module, unwrap
from .lora_base import LoRALayer
from .lora_conv import LoRAConv2d
from .registry import register_method

__all__ = ["LoRA", "LoRALinear", "drop_mask", "part_rows", "unfolded"]


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
        if not 0.0 <= finite("LoRA dropout", self.dropout) < 1.0:
            raise PlanError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        finite("LoRA alpha", self.alpha)
        if isinstance(self.targets, str):
            self.targets = (self.targets,)
        if not self.targets:
            raise PlanError("LoRA needs at least one target (a role like 'q' or a regex)")
        self.targets = tuple(self.targets)
        QuantSpec(bits=self.bits, criterion=self.criterion)  # validates

    def plan(self, model: nn.Module, family: Family) -> Plan:
        kinds = (*linear_types(), nn.Conv2d)
        names = resolve_modules(model, family, self.targets, kinds=kinds, what="LoRA target")
        # parts of fused linears (GPT-2's c_attn: q, k, v); None = the whole output
        parts: dict[str, set[int] | None] = {}
        n_parts: dict[str, int] = {}
        for target in self.targets:
            fused = family.fused.get(target)
            for n in resolve_modules(model, family, [target], kinds=kinds, what="LoRA target"):
                if fused is None or (n in parts and parts[n] is None):
                    parts[n] = None
                else:
                    parts.setdefault(n, set()).add(fused[0])  # type: ignore[union-attr]
                    n_parts[n] = fused[1]
        entries = []
        for n in names:
            settings = self.settings()
            chosen = parts[n]
            if chosen is not None and len(chosen) < n_parts[n]:
                settings["parts"] = sorted(chosen)
                settings["n_parts"] = n_parts[n]
            entries.append(PlanEntry("lora", n, settings))
        return Plan(entries=entries)


def part_rows(out_features: int, parts: list[int], n_parts: int) -> list[int]:
    """Output rows of ``parts`` of a fused linear split into ``n_parts`` equal slices."""
    if n_parts < 1 or out_features % n_parts:
        raise PlanError(f"{out_features} outputs cannot be split into {n_parts} equal parts")
    size = out_features // n_parts
    bad = [p for p in parts if not 0 <= p < n_parts]
    if bad or not parts:
        raise PlanError(f"fused parts {parts} out of range [0, {n_parts})")
    return [p * size + j for p in sorted(set(parts)) for j in range(size)]


_UNFOLDED = threading.local()


@contextlib.contextmanager
def unfolded() -> Iterator[None]:
    """Compute LoRA as ``x W^T + s (x A^T) B^T`` (never folded into ``W + s B A``) inside.

    The fold is the same function with another rounding (that of a merged model). On models
    with very large activations (LLMs' outlier channels, ~2e4 in SmolLM2's FFN) the two orders
    differ by ~1e-2 in the logits, fp32 rounding either way; the unfolded order is the one
    Hugging Face peft uses, so outputs equal peft's bit for bit. Thread-local.
    """
    before = getattr(_UNFOLDED, "on", False)
    _UNFOLDED.on = True
    try:
        yield
    finally:
        _UNFOLDED.on = before


def _fold_pays(tokens: int, in_features: int, out_features: int, dtype: torch.dtype) -> bool:
    """Whether to fold ``s B A`` into a temporary weight for this call (see module docstring).

    Folding costs one ``[out, in]`` matrix; keeping the update separate costs two extra passes
    over ``[tokens, out]`` (forward) and ``[tokens, in]`` (backward). Only for 32/64-bit floats:
    in 16-bit formats ``W + s B A`` would round away most of a small update.
    """
    if dtype not in (torch.float32, torch.float64) or getattr(_UNFOLDED, "on", False):
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
    """An nn.Linear (or ``Conv1D``) with a LoRA update (see module docstring).

    Args:
        rows: output rows the update goes to (a fused linear's parts); ``None``: all of them.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        bits: int = 32,
        criterion: str = "l1",
        rows: list[int] | None = None,
    ) -> None:
        linear = unwrap(base_layer)
        if not isinstance(linear, linear_types()):
            raise PlanError(f"LoRA needs an nn.Linear or Conv1D, got {type(linear).__name__}")
        d_in, d_out = dims(linear)
        a_shape = (r, d_in)
        b_shape = (d_out if rows is None else len(rows), r)
        super().__init__(base_layer, r, alpha, dropout, bits, criterion, a_shape, b_shape)
        self.rows: Tensor | None
        if rows is None:
            self.rows = None
        else:
            if not rows or min(rows) < 0 or max(rows) >= d_out or len(set(rows)) != len(rows):
                raise PlanError(f"LoRA rows must be distinct indices in [0, {d_out})")
            self.register_buffer(
                "rows", torch.tensor(rows, dtype=torch.long, device=self.lora_A.device), False
            )

    def _base_weight(self) -> Tensor:
        return weight_oi(unwrap(self.base_layer))

    @property
    def in_features(self) -> int:
        return self.lora_A.shape[1]

    @property
    def out_features(self) -> int:
        return dims(unwrap(self.base_layer))[1]

    def delta_weight(self) -> Tensor:
        """The dense update ``s B A`` (out x in; zero outside :attr:`rows`)."""
        a, b = self.weights()
        delta = (b @ a) * self.scaling
        if self.rows is None:
            return delta
        full = delta.new_zeros(self.out_features, delta.shape[1])
        return full.index_copy(0, self.rows, delta)

    def full_b(self) -> Tensor:
        """``B`` with a row for every output (zeros outside :attr:`rows`), as peft stores it."""
        _, b = self.weights()
        if self.rows is None:
            return b
        return b.new_zeros(self.out_features, b.shape[1]).index_copy(0, self.rows, b)

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled or self.merged:
            return self.base_layer(x)
        a, b = self.weights()
        base = self.base_layer
        fused = (
            self.rows is None
            and isinstance(base, linear_types())
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
                x, weight_oi(base), base.bias, a, b, self.scaling, drop, keep_scale
            )
        # General path: wrapped/trainable base weights, mixed precision (autocast), or parts.
        h = F.dropout(x, self.dropout, self.training) if self.dropout > 0 else x
        y = self.base_layer(x)
        update = F.linear(F.linear(h, a.to(h.dtype)), b.to(h.dtype)) * self.scaling
        if self.rows is None:
            return y + update
        return y.index_add(-1, self.rows, update.to(y.dtype))


@register_method(LoRA, order=3)
def inject_lora(model: nn.Module, entry: PlanEntry, plan: Plan) -> None:
    s = entry.settings
    module = get_module(model, entry.target)
    common: dict[str, Any] = {
        "r": int(s["r"]),
        "alpha": float(s["alpha"]),
        "dropout": float(s.get("dropout", 0.0)),
        "bits": int(s.get("bits", 32)),
        "criterion": str(s.get("criterion", "l1")),
    }
    if isinstance(unwrap(module), nn.Conv2d):
        wrapped: LoRALayer = LoRAConv2d(module, **common)
    else:
        rows = None
        if "parts" in s:
            d_out = dims(unwrap(module))[1]
            rows = part_rows(d_out, [int(p) for p in s["parts"]], int(s["n_parts"]))
        wrapped = LoRALinear(module, rows=rows, **common)
    set_module(model, entry.target, wrapped)
