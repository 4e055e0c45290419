"""Tiny run configs shared by the application and benchmark tests."""

from __future__ import annotations

from slimtune.app.config import RunConfig


def tiny_lightpeft_run(epochs: int, **pruning: object) -> RunConfig:
    """A tiny Light-PEFT run config (tiny-vit on 16 images, an early phase of 2 steps)."""
    return RunConfig(
        name="lp",
        model="tiny-vit",
        task="shapes-count",
        data={"image_size": 32, "n_train": 16, "n_val": 8, "n_test": 8},
        train={"epochs": epochs, "batch_size": 8, "eval_batch_size": 16, "lr": 0.01, "seed": 2},
        pruning={"method": "light-peft", "early_steps": 2, "r": 4, **pruning},
    )
