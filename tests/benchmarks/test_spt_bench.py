"""The SPT benchmark's methods are valid run configs."""

from __future__ import annotations

import pytest
from tiny_models import tiny_vit

import slimtune


@pytest.mark.parametrize("method", ["linear", "full", "lora", "adapter", "spt-lora", "spt-adapter"])
def test_every_benchmark_method_is_a_valid_run_config(method):
    """Each ``slimtune bench spt`` method builds a run config that trains what it says."""
    from benchmarks.spt import FULL, METHODS, method_config
    from slimtune.app.config import RunConfig, build_methods

    assert method in METHODS
    part = method_config(method, budget=1000, adapter_dim=4, setup=FULL)
    cfg = RunConfig(model="dinov2-s", task="digits", **part)
    model = slimtune.apply(tiny_vit(), build_methods(cfg.methods), head="classifier")
    s = slimtune.summary(model)
    backbone = sum(p.numel() for n, p in model.named_parameters() if "classifier" not in n)
    trained = s.trainable - s.by_method.get("head", 0)
    if method == "full":
        assert trained == backbone  # every backbone parameter
    elif method == "linear" or method.startswith("spt"):
        assert trained == 0  # head only (SPT's plan comes from its allocation pass)
        assert (cfg.allocation is not None) == method.startswith("spt")
    else:
        assert 0 < trained < backbone
