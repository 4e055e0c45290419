"""Shared fixtures: each tiny model family (see tiny_models.py)."""

from __future__ import annotations

import os

import pytest
import torch
from tiny_models import MODELS

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)


@pytest.fixture(params=sorted(MODELS))
def tiny(request: pytest.FixtureRequest):
    """(factory, inputs) for each tiny model family."""
    return MODELS[request.param]
