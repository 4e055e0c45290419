"""What every LoRA wrapper shares: the A/B parameters, their quantized views, merge/unmerge.

Subclasses give the shapes of ``A`` and ``B`` and implement ``delta_weight`` (the dense update
with the base weight's shape) and ``forward``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..linear import float_dtype
from ..qbase.layers import refuse_merge
from ..quant import QuantSpec, quantize
from .base import QuantizedWeights, Wrapper, unwrap

__all__ = ["LoRALayer"]


class LoRALayer(QuantizedWeights, Wrapper):
    """Base of :class:`~slimtune.methods.lora.LoRALinear` and ``LoRAConv2d``.

    ``A`` is Kaiming-uniform and ``B`` zero (a tiny truncated normal when quantized: a zero
    matrix has no spread to standardise), so a fresh layer leaves the output unchanged.
    """

    method = "lora"
    mergeable = True
    quantized_params = ("lora_A", "lora_B")

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        dropout: float,
        bits: int,
        criterion: str,
        a_shape: tuple[int, ...],
        b_shape: tuple[int, ...],
    ) -> None:
        super().__init__(base_layer)
        # device and compute dtype from the layer itself (a quantized base is not dequantized)
        inner = unwrap(base_layer)
        w = inner.weight
        assert isinstance(w, Tensor)
        kw: dict[str, Any] = {"device": w.device, "dtype": float_dtype(inner)}
        self.r = r
        self.alpha = alpha
        self.scaling = alpha / r
        self.dropout = float(dropout)
        self.quant = QuantSpec(bits=bits, criterion=criterion)
        self.lora_A = nn.Parameter(torch.empty(a_shape, **kw))
        self.lora_B = nn.Parameter(torch.zeros(b_shape, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if self.quant.bits < 32:
            nn.init.trunc_normal_(self.lora_B, std=1e-3, a=-2e-3, b=2e-3)

    def _base_weight(self) -> Tensor:
        w = unwrap(self.base_layer).weight
        assert isinstance(w, Tensor)
        return w

    def weights(self) -> tuple[Tensor, Tensor]:
        """A and B as used in the forward pass (quantized when ``bits < 32``)."""
        if self.quant.bits >= 32:
            return self.lora_A, self.lora_B
        a = self.pinned("lora_A", self.lora_A)
        b = self.pinned("lora_B", self.lora_B)
        return (
            quantize(self.lora_A, self.quant) if a is None else a,
            quantize(self.lora_B, self.quant) if b is None else b,
        )

    def delta_weight(self) -> Tensor:
        """The dense update ``s B A`` with the base weight's shape."""
        raise NotImplementedError

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        refuse_merge(unwrap(self.base_layer), "LoRA")
        w = self._base_weight()
        w += self.delta_weight().to(w.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        w = self._base_weight()
        w -= self.delta_weight().to(w.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, dropout={self.dropout}, bits={self.quant.bits}"
