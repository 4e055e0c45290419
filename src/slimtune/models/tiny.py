"""Tiny randomly initialised models for tests, CI and smoke runs (no download, no package)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .classifier import ImageClassifier

__all__ = ["tiny_vit", "TINY_MODELS"]


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
    model = ImageClassifier(Dinov2Model(cfg), num_labels, pooling="cls")
    return model, {"kind": "image", "hidden": 32}


TINY_MODELS = {"tiny-vit": tiny_vit}
