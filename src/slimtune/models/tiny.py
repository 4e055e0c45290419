"""Tiny randomly initialised models for tests, CI and smoke runs (no download, no package)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["ImageHead", "tiny_vit", "TINY_MODELS"]


class ImageHead(nn.Module):
    """A ViT/DINOv2 backbone with a linear classifier on the final CLS token."""

    def __init__(self, backbone: nn.Module, hidden: int, num_labels: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Linear(hidden, num_labels)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        h = self.backbone(pixel_values=pixel_values).last_hidden_state
        return self.classifier(h[:, 0])


def tiny_vit(num_labels: int, seed: int = 0) -> tuple[nn.Module, dict[str, Any]]:
    """A 2-layer, width-32 DINOv2 classifier for 28-112 px images."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    cfg = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        mlp_ratio=2,
        image_size=56,
        patch_size=8,
    )
    model = ImageHead(Dinov2Model(cfg), 32, num_labels)
    return model, {"kind": "image", "hidden": 32}


TINY_MODELS = {"tiny-vit": tiny_vit}
