"""Tiny run configs shared by the application and benchmark tests."""

from __future__ import annotations

from slimtune.app.config import RunConfig


def tiny_image_run(name: str, epochs: int, **sections: object) -> RunConfig:
    """A tiny run config: tiny-vit on 16 images of shapes-count, ``sections`` added."""
    return RunConfig(
        name=name,
        model="tiny-vit",
        task="shapes-count",
        data={"image_size": 32, "n_train": 16, "n_val": 8, "n_test": 8},
        train={"epochs": epochs, "batch_size": 8, "eval_batch_size": 16, "lr": 0.01, "seed": 2},
        **sections,  # type: ignore[arg-type]
    )


def tiny_lightpeft_run(epochs: int, **pruning: object) -> RunConfig:
    """A tiny Light-PEFT run config (tiny-vit on 16 images, an early phase of 2 steps)."""
    return tiny_image_run(
        "lp", epochs, pruning={"method": "light-peft", "early_steps": 2, "r": 4, **pruning}
    )


def tiny_wheat_study():  # -> studies.wheat.study.Study
    """The wheat study on 8x8 tiles, a few per split."""
    from studies.wheat.study import Split, Study

    return Study(
        source_train=Split("A", 2019, 6, 0, size=8),
        source_val=Split("A", 2019, 2, 1, size=8),
        target_train=Split("B", 2020, 4, 10, size=8),
        target_val=Split("B", 2020, 2, 11, size=8),
        in_domain=Split("B", 2020, 2, 12, size=8),
        cross_year=Split("B", 2021, 2, 13, size=8),
        cross_area=Split("C", 2020, 2, 14, size=8),
    )
