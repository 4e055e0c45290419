"""Winter-wheat benchmark: TSViT pre-trained on a source domain, adapted with every method.

Steps (:mod:`studies.wheat.study`):

1. Generate the synthetic splits under ``$SLIMTUNE_DATA/s2synth`` (kept between runs).
2. Pre-train the small TSViT on area A / 2019 (7 classes), or reuse the cached checkpoint of the
   same settings (``pretrain.cached`` in the JSON says which; ``pretrain.train_s`` is the time it
   took when it was trained).
3. For each method (``studies/wheat/configs/<method>.yaml``): load the checkpoint, Linear(7 -> 2) on the
   logits, apply the method, train on area B / 2020, keep the epoch with the best validation F1,
   and score winter wheat on ``in_domain`` (B 2020, unseen tiles), ``cross_year`` (B 2021) and
   ``cross_area`` (C 2020).

``--quick`` uses the smaller :meth:`Study.quick` data, the 6-epoch pre-training and 10 adaptation
epochs (instead of the configs' 20). The JSON holds ``f1.<method>.<split>``,
``iou.<method>.<split>``, ``precision``/``recall`` likewise, ``trainable_pct.<method>`` (of the
benchmarked small TSViT), ``trainable_pct_pastis.<method>`` (the same method on the paper's PASTIS
configuration, counted without training), ``train_s.<method>`` (seconds in training steps) and a
``findings`` block. Prediction maps (truth, prediction, errors) go to ``runs/wheat[-quick]/``.

Run ``slimtune bench wheat [--quick] [--out FILE]``.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from slimtune import core
from slimtune.io import atomic_write_text
from slimtune.models.tsvit import TSViT
from studies.wheat.study import (
    SPLITS,
    PretrainConfig,
    Study,
    adapt,
    build_adapted,
    load_wheat_config,
    pretrain,
)

__all__ = ["run", "METHODS", "QUICK_EPOCHS", "config_dir"]

METHODS = ("head", "bitfit", "lora", "adaptformer", "prompt-shallow", "prompt-deep", "full")
"""Benchmarked methods, each a run config ``studies/wheat/configs/<method>.yaml``."""
PEFT = tuple(m for m in METHODS if m != "full")
QUICK_EPOCHS = 10
"""Adaptation epochs of ``--quick``."""
RESULTS = Path("benchmarks") / "results"


def config_dir() -> Path:
    """The wheat study's run configs (``studies/wheat/configs``)."""
    from studies.wheat import CONFIGS

    return CONFIGS


def pastis_pct(cfg: Any) -> float:
    """Trainable percentage of the run's methods on the PASTIS-configured TSViT (19 classes)."""
    torch.manual_seed(0)
    model = build_adapted(TSViT.pastis(), replace(cfg, model="pastis"))
    return core.summary(model).pct


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _machine() -> dict[str, Any]:
    return {
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def _findings(res: dict[str, Any]) -> dict[str, Any]:
    f1, pct = res["f1"], res["trainable_pct"]
    full = f1["full"]["in_domain"]
    budget = [m for m in PEFT if pct[m] <= 2.0]
    best = max(PEFT, key=lambda m: f1[m]["in_domain"])
    best_b = max(budget, key=lambda m: f1[m]["in_domain"]) if budget else None
    ood = {m: (f1[m]["cross_year"] + f1[m]["cross_area"]) / 2 for m in METHODS}
    drop = {m: f1[m]["in_domain"] - ood[m] for m in METHODS}
    ranked = sorted(METHODS, key=lambda m: -ood[m])
    return {
        "best_peft_in_domain": best,
        "best_peft_gap_to_full_points": 100 * (full - f1[best]["in_domain"]),
        "best_peft_within_2pct_budget": best_b,
        "best_peft_within_2pct_budget_gap_points": (
            100 * (full - f1[best_b]["in_domain"]) if best_b else None
        ),
        "ood_mean_f1": ood,
        "ood_drop_points": {m: 100 * d for m, d in drop.items()},
        "best_ood": ranked[0],
        "best_ood_margin_points": 100 * (ood[ranked[0]] - ood[ranked[1]]),
        "best_ood_vs_full_points": 100 * (ood[ranked[0]] - ood["full"]),
    }


def format_table(res: dict[str, Any]) -> str:
    """Markdown table of the results."""
    rows = [
        "| method | trainable % (small) | % (PASTIS cfg) | F1 in-domain | F1 cross-year "
        "| F1 cross-area | IoU in-domain | train s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in res["f1"]:
        f = res["f1"][m]
        rows.append(
            f"| {m} | {res['trainable_pct'][m]:.2f} | {res['trainable_pct_pastis'][m]:.2f} "
            f"| {100 * f['in_domain']:.1f} | {100 * f['cross_year']:.1f} "
            f"| {100 * f['cross_area']:.1f} | {100 * res['iou'][m]['in_domain']:.1f} "
            f"| {res['train_s'][m]:.0f} |"
        )
    return "\n".join(rows)


def run(
    quick: bool = False,
    out: str | None = None,
    methods: tuple[str, ...] | list[str] = METHODS,
    progress: bool = False,
) -> dict[str, Any]:
    """Run the benchmark, save the JSON, print it and return it.

    Args:
        quick: the smaller study, 6-epoch pre-training and 10 adaptation epochs.
        out: JSON path (default ``benchmarks/results/wheat_quick.json`` / ``wheat.json``).
        methods: subset of :data:`METHODS` to run.
        progress: show per-epoch progress bars.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    t0 = time.perf_counter()
    study = Study.quick() if quick else Study()
    pcfg = PretrainConfig.quick() if quick else PretrainConfig()
    tag = "wheat_quick" if quick else "wheat"
    runs = Path("runs") / tag.replace("_", "-")
    print(f"[wheat] pre-training ({pcfg.key(study)}) ...", flush=True)
    path, meta = pretrain(study, pcfg, progress=progress)
    print(
        f"[wheat] pre-trained: {'cached' if meta['cached'] else 'trained'}, "
        f"val pixel accuracy {meta['val']['pixel_accuracy']:.3f}",
        flush=True,
    )
    res: dict[str, Any] = {
        "benchmark": "wheat",
        "quick": quick,
        "machine": _machine(),
        "model": "TSViT small (d=64, 2+2 blocks, 4 heads x 16, FFN 128), 24x24 tiles, 9 dates",
        "class_change": "Linear(7 -> 2) on the logits (classes: linear)",
        "f1_rule": "softmax probability of winter wheat >= 0.5 (not thresholded logits)",
        "pretrain": {
            "cached": meta["cached"],
            "path": str(path),
            "train_s": meta["train_s"],
            "epochs": meta["train"]["epochs"],
            "best_epoch": meta["best_epoch"],
            "val_pixel_accuracy": meta["val"]["pixel_accuracy"],
            "source": meta["source"],
        },
        "data": {k: asdict(v) for k, v in asdict_study(study).items()},
        "adapt_epochs": QUICK_EPOCHS if quick else None,
        "f1": {},
        "iou": {},
        "precision": {},
        "recall": {},
        "trainable_pct": {},
        "trainable_params": {},
        "trainable_pct_pastis": {},
        "train_s": {},
        "best_epoch": {},
        "val_f1": {},
    }
    for m in methods:
        cfg = load_wheat_config(config_dir() / f"{m}.yaml")
        if quick:
            cfg = replace(cfg, train=replace(cfg.train, epochs=QUICK_EPOCHS))
        print(f"[wheat] {m} ...", flush=True)
        r = adapt(cfg, path, study=study, out=runs / m, progress=progress)
        for key in ("f1", "iou", "precision", "recall"):
            res[key][m] = {s: r["test"][s][key] for s in SPLITS}
        res["trainable_pct"][m] = r["trainable_pct"]
        res["trainable_params"][m] = r["trainable_params"]
        res["trainable_pct_pastis"][m] = pastis_pct(cfg)
        res["train_s"][m] = r["train_s"]
        res["best_epoch"][m] = r["best_epoch"]
        res["val_f1"][m] = r["val"]["f1"]
        f = res["f1"][m]
        print(
            f"[wheat] {m}: {r['trainable_pct']:.2f}% trainable, F1 in-domain "
            f"{f['in_domain']:.3f} cross-year {f['cross_year']:.3f} cross-area "
            f"{f['cross_area']:.3f}, {r['train_s']:.0f} s",
            flush=True,
        )
    if set(METHODS) <= set(methods):
        res["findings"] = _findings(res)
    res["maps"] = str(runs / "<method>" / "maps")
    res["wall_s"] = time.perf_counter() - t0
    dest = Path(out) if out else RESULTS / f"{tag}.json"
    atomic_write_text(dest, json.dumps(res, indent=1) + "\n")
    print(format_table(res))
    print(json.dumps(res, indent=1))
    print(f"saved {dest}")
    return res


def asdict_study(study: Study) -> dict[str, Any]:
    """The study's splits by name."""
    return {
        name: getattr(study, name)
        for name in (
            "source_train",
            "source_val",
            "target_train",
            "target_val",
            "in_domain",
            "cross_year",
            "cross_area",
        )
    }


def main(argv: list[str] | None = None) -> int:
    """``slimtune bench wheat [--quick] [--out FILE]``."""
    from benchmarks.common import quick_out_main

    return quick_out_main("slimtune bench wheat", __doc__.splitlines()[0], run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
