"""A linear classification head on a ViT-like backbone (DINOv2's linear-probe recipe).

::

    pixel_values (B,3,H,W) ─> backbone ─> last_hidden_state (B, 1+N, D)   (final layernorm applied)
                                             │
                     ┌───────────────────────┴───────────────────────┐
                 CLS token (B, D)                    mean of the N patch tokens (B, D)
                     └──────────── concat (B, 2D) ───────────────────┘
                                             │
                                  classifier: Linear(2D, num_labels) ─> logits (B, num_labels)

Concatenating the CLS token with the mean patch token is what DINOv2 reports for its linear
evaluation; ``pooling="cls"`` uses the CLS token alone (``Linear(D, num_labels)``).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

__all__ = ["ImageClassifier"]


class ImageClassifier(nn.Module):
    """``backbone`` + linear ``classifier``; ``forward(pixel_values)`` returns the logits tensor.

    Args:
        backbone: a module whose output has ``last_hidden_state`` (B, 1+N, D) with the CLS token
            first, such as ``transformers.Dinov2Model`` or ``ViTModel``.
        num_labels: number of classes.
        hidden_size: D; read from ``backbone.config.hidden_size`` when omitted.
        pooling: ``"cls+mean"`` (CLS concatenated with the mean patch token) or ``"cls"``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_labels: int,
        *,
        hidden_size: int | None = None,
        pooling: Literal["cls+mean", "cls"] = "cls+mean",
    ) -> None:
        super().__init__()
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        if pooling not in ("cls+mean", "cls"):
            raise ValueError(f"pooling must be 'cls+mean' or 'cls', got {pooling!r}")
        if hidden_size is None:
            config = getattr(backbone, "config", None)
            hidden_size = getattr(config, "hidden_size", None)
            if hidden_size is None:
                raise ValueError("hidden_size is required: the backbone has no config.hidden_size")
        self.backbone = backbone
        self.pooling = pooling
        self.num_labels = num_labels
        width = 2 * hidden_size if pooling == "cls+mean" else hidden_size
        self.classifier = nn.Linear(width, num_labels)
        nn.init.trunc_normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    @property
    def config(self) -> Any:
        """The backbone's configuration (``None`` when it has none)."""
        return getattr(self.backbone, "config", None)

    def features(self, pixel_values: Tensor) -> Tensor:
        """Pooled features (B, 2D) or (B, D) that the classifier reads."""
        hidden = self.backbone(pixel_values=pixel_values).last_hidden_state
        cls = hidden[:, 0]
        if self.pooling == "cls":
            return cls
        return torch.cat([cls, hidden[:, 1:].mean(dim=1)], dim=-1)

    def forward(self, pixel_values: Tensor) -> Tensor:
        """Logits (B, num_labels) for images (B, 3, H, W); H and W multiples of the patch size."""
        return self.classifier(self.features(pixel_values))
