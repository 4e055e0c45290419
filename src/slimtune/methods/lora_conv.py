"""LoRA on 2-D convolutions (patch embeddings, convolutional backbones).

::

    x ──► Conv(W, k×k, stride s) (frozen) ─────────────────────┐
    │                                                           + ──► y
    └──► dropout ─► Conv(A: in→r, k×k, stride s) ─► Conv(B: r→out, 1×1) ┘ · alpha / r

``A`` has the frozen convolution's kernel, stride, padding and dilation; ``B`` is a 1x1
convolution. The update of the weight is therefore ``ΔW[o, i, u, v] = (alpha/r) Σ_j B[o, j]
A[j, i, u, v]``, a rank-``r`` matrix over the flattened ``(i, u, v)`` axis, which ``merge``
folds into ``W``. The tensor shapes (``A``: ``[r, in, kh, kw]``, ``B``: ``[out, r, 1, 1]``) are
those of Hugging Face peft's convolutional LoRA, so the export writes them unchanged.
Grouped convolutions and padding modes other than zeros are refused.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import PlanError
from .base import unwrap
from .lora_base import LoRALayer

__all__ = ["LoRAConv2d"]


class LoRAConv2d(LoRALayer):
    """An nn.Conv2d with a LoRA update (see module docstring)."""

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        bits: int = 32,
        criterion: str = "l1",
    ) -> None:
        conv = unwrap(base_layer)
        if not isinstance(conv, nn.Conv2d):
            raise PlanError(f"LoRAConv2d needs an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise PlanError(f"LoRA on grouped convolutions is not supported (groups={conv.groups})")
        if conv.padding_mode != "zeros":
            raise PlanError(
                f"LoRA on convolutions needs padding_mode='zeros', got {conv.padding_mode!r}"
            )
        a_shape = (r, conv.in_channels, *conv.kernel_size)
        b_shape = (conv.out_channels, r, 1, 1)
        super().__init__(base_layer, r, alpha, dropout, bits, criterion, a_shape, b_shape)

    def delta_weight(self) -> Tensor:
        """The dense update ``s B A`` with the convolution weight's shape."""
        a, b = self.weights()
        delta = b.flatten(1) @ a.flatten(1)
        return delta.reshape(b.shape[0], *a.shape[1:]) * self.scaling

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        if not self.enabled or self.merged:
            return y
        conv = unwrap(self.base_layer)
        assert isinstance(conv, nn.Conv2d)
        a, b = self.weights()
        h = F.dropout(x, self.dropout, self.training) if self.dropout > 0 else x
        u = F.conv2d(h, a.to(h.dtype), None, conv.stride, conv.padding, conv.dilation)
        return y + F.conv2d(u, b.to(u.dtype)) * self.scaling
