"""Low-bit adapters on dinov2-s: accuracy and bytes on disk from 32 down to 1 bit per weight.

Variants (Jie et al., ICCV 2023, on the VTAB-1k-style image tasks of :mod:`slimtune.app.data`):

==============  =====================================================================
``fp32``        AdaptFormer dim 32 (parallel, ReLU, no bias, ``s = 1``), float head
``8bit`` ...    the same adapter trained and stored at 8, 4, 2 bits per weight
``1bit``        ... at 1 bit (Bi-AdaptFormer), float head
``1bit-bihead`` Bi-AdaptFormer + Bi-Head: the classifier a 1-bit matrix without bias
``lora-1bit``   Bi-LoRA: LoRA r=16 on q and v (``s = alpha / r = 1``), 1 bit, float head
==============  =====================================================================

Every run goes through the library's trainer (:func:`slimtune.app.loop.train`): AdamW with
cosine warm-up, model selection on the validation split (best epoch), test accuracy of the
selected epoch reported. Bytes are measured on disk: the adapter directory that
:func:`slimtune.save` writes (manifest + safetensors, head included); ``bound_bytes`` is
``bits x weights + 8 bytes of mu/sigma per matrix`` plus 4 bytes per float weight
(:func:`slimtune.storage_report`). A head's size depends on the number of classes, so
``bytes``/``bound_bytes`` are those of the first task; ``bytes_per_task`` has the others.
Variants trained in no run (``--quick`` trains only ``fp32`` and ``1bit``) are sized from an
untrained adapter of the same shape: sizes do not depend on the values.

``--quick``: 2 tasks x {fp32, 1bit} x 1 seed, about 10 minutes on 2 CPU cores. The full run is
all 6 image tasks x 7 variants (about 2 hours on 2 cores). Results so far are rewritten to the
JSON file after every run; a benchmark restarted on the same file skips the runs it holds that
were made with the same training settings (so more variants or tasks can be added to a file).

Run ``slimtune bench lowbit [--quick] [--out FILE]``.
"""

from __future__ import annotations

import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "run",
    "adapter_sizes",
    "size_limit",
    "VARIANTS",
    "TASKS",
    "QUICK",
    "FULL",
    "DEFAULT_OUT",
]

TASKS = (
    "fashion-mnist",
    "mnist-5k",
    "digits",
    "shapes-count",
    "shapes-position",
    "shapes-orientation",
)
ADAPTER: dict[str, Any] = {
    "name": "adapter",
    "dim": 32,
    "placement": "parallel",
    "activation": "relu",
    "bias": False,
    # The paper searches s in {0.01, 0.1, 1, 10, 100} per task. One value for every task and
    # bit width here, chosen on validation in a quick pilot: s = 1 lifted validation accuracy
    # over s = 0.1 for fp32 (0.855 / 0.940 vs 0.825 / 0.880 on fashion-mnist / shapes-count)
    # and for 1 bit (0.845 / 0.915 vs 0.825 / 0.765).
    "scale": 1.0,
}
LORA: dict[str, Any] = {"name": "lora", "r": 16, "alpha": 16.0, "targets": ["q", "v"]}
VARIANTS: dict[str, dict[str, Any]] = {
    "fp32": {"methods": [{**ADAPTER, "bits": 32}], "head_bits": 32},
    "1bit": {"methods": [{**ADAPTER, "bits": 1}], "head_bits": 32},
    "1bit-bihead": {"methods": [{**ADAPTER, "bits": 1}], "head_bits": 1},
    "lora-1bit": {"methods": [{**LORA, "bits": 1}], "head_bits": 32},
    "2bit": {"methods": [{**ADAPTER, "bits": 2}], "head_bits": 32},
    "4bit": {"methods": [{**ADAPTER, "bits": 4}], "head_bits": 32},
    "8bit": {"methods": [{**ADAPTER, "bits": 8}], "head_bits": 32},
}
"""In the order they are run: variant by variant (every task), so that a stopped benchmark has
comparable variants; the 1-bit forms first."""
COMMON: dict[str, Any] = {
    "model": "dinov2-s",
    "image_size": 56,
    "n_train": 800,
    "n_val": 200,
    "batch_size": 32,
    "eval_batch_size": 100,
    "lr": 1e-3,
    "weight_decay": 1e-4,
    "warmup": 0.1,
}
QUICK: dict[str, Any] = {
    **COMMON,
    "tasks": ["fashion-mnist", "shapes-count"],
    "variants": ["fp32", "1bit"],
    "seeds": [0],
    "epochs": 6,
    "n_test": 500,
}
FULL: dict[str, Any] = {
    **COMMON,
    "tasks": list(TASKS),
    "variants": list(VARIANTS),
    "seeds": [0],
    "epochs": 10,
    "n_test": 1000,
}
DEFAULT_OUT = Path("benchmarks") / "results"
HEADER_ALLOWANCE = 2048
BOUND_SLACK = 1.03


def _machine() -> dict[str, Any]:
    return {
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def _config(settings: dict[str, Any], task: str, variant: str, seed: int) -> Any:
    from slimtune.app.config import DataConfig, RunConfig, TrainConfig

    v = VARIANTS[variant]
    return RunConfig(
        name=f"lowbit-{task}-{variant}-s{seed}",
        model=settings["model"],
        task=task,
        methods=[dict(m) for m in v["methods"]],
        head_bits=v["head_bits"],
        data=DataConfig(
            image_size=settings["image_size"],
            n_train=settings["n_train"],
            n_val=settings["n_val"],
            n_test=settings["n_test"],
        ),
        train=TrainConfig(
            epochs=settings["epochs"],
            batch_size=settings["batch_size"],
            eval_batch_size=settings["eval_batch_size"],
            lr=settings["lr"],
            weight_decay=settings["weight_decay"],
            warmup=settings["warmup"],
            seed=seed,
        ),
    )


def size_limit(bound_bytes: float) -> float:
    """The on-disk target for an adapter whose theoretical bound is ``bound_bytes``:
    ``1.03 x bound + 2 KiB`` (the 2 KiB for the manifest and safetensors' header)."""
    return BOUND_SLACK * bound_bytes + HEADER_ALLOWANCE


def adapter_sizes(adapter_dir: Path) -> dict[str, Any]:
    """Bytes of a saved adapter directory (all files), its bound, weights file and header
    (everything that is not tensor data), from :func:`slimtune.storage_report`."""
    from slimtune.io import storage_report

    rep = storage_report(adapter_dir)
    files = sum(f.stat().st_size for f in adapter_dir.iterdir() if f.is_file())
    return {
        "bytes": files,
        "bound_bytes": rep["bound_bytes"],
        "weights_file_bytes": rep["disk_bytes"]["adapter.safetensors"],
        "header_bytes": files - sum(rep["parts"].values()),
        "parts": rep["parts"],
    }


def _untrained_sizes(settings: dict[str, Any], task: str, variant: str, tmp: Path) -> dict:
    """Sizes of a saved, untrained adapter of ``variant`` for ``task`` (values do not matter)."""
    from slimtune import core
    from slimtune.app.build import build_model
    from slimtune.app.config import build_methods
    from slimtune.app.data.registry import load_task
    from slimtune.io import save

    n_classes = load_task(task, image_size=14, n_train=2, n_val=2, n_test=1).num_classes
    model, _ = build_model(settings["model"], n_classes)
    v = VARIANTS[variant]
    core.apply(model, build_methods([dict(m) for m in v["methods"]]), head_bits=v["head_bits"])
    out = save(model, tmp / f"untrained-{task}-{variant}")
    return adapter_sizes(out)


def _write(path: Path, result: dict[str, Any]) -> None:
    from slimtune.io import atomic_write_text

    atomic_write_text(path, json.dumps(result, indent=1) + "\n")


def _summarise(result: dict[str, Any], settings: dict[str, Any], tmp: Path) -> None:
    """Fill ``acc``, ``mean``, ``bytes``, ``bound_bytes`` and ``targets`` from the runs."""
    runs = result["runs"]
    tasks, variants = settings["tasks"], settings["variants"]
    acc: dict[str, dict[str, float]] = {}
    val: dict[str, dict[str, float]] = {}
    for task in tasks:
        for variant in variants:
            done = [r for r in runs.values() if r["task"] == task and r["variant"] == variant]
            if done:
                acc.setdefault(task, {})[variant] = round(
                    statistics.mean(r["test_acc"] for r in done), 4
                )
                val.setdefault(task, {})[variant] = round(
                    statistics.mean(r["val_acc"] for r in done), 4
                )
    mean = {}
    for variant in variants:
        per_task = [acc[t][variant] for t in tasks if variant in acc.get(t, {})]
        if len(per_task) == len(tasks):
            mean[variant] = round(statistics.mean(per_task), 4)
    sizes: dict[str, dict[str, Any]] = {}
    for task in tasks:
        for variant in VARIANTS:
            trained = [r for r in runs.values() if r["task"] == task and r["variant"] == variant]
            if trained:
                sizes.setdefault(variant, {})[task] = {**trained[0]["sizes"], "source": "trained"}
            elif task == tasks[0]:
                size = _untrained_sizes(settings, task, variant, tmp)
                sizes.setdefault(variant, {})[task] = {**size, "source": "untrained"}
    ref = tasks[0]
    result["acc"] = acc
    result["val_acc"] = val
    result["mean"] = mean
    result["bytes"] = {v: sizes[v][ref]["bytes"] for v in VARIANTS}
    result["bound_bytes"] = {v: sizes[v][ref]["bound_bytes"] for v in VARIANTS}
    result["weights_file_bytes"] = {v: sizes[v][ref]["weights_file_bytes"] for v in VARIANTS}
    result["header_bytes"] = {v: sizes[v][ref]["header_bytes"] for v in VARIANTS}
    result["bytes_per_task"] = {
        v: {t: s["bytes"] for t, s in per.items()} for v, per in sizes.items()
    }
    result["bytes_source"] = {v: sizes[v][ref]["source"] for v in VARIANTS}
    result["bytes_task"] = ref
    result["targets"] = _targets(result)


def _targets(result: dict[str, Any]) -> dict[str, Any]:
    mean, nbytes, bound = result["mean"], result["bytes"], result["bound_bytes"]
    out: dict[str, Any] = {}
    if "fp32" in mean and "1bit" in mean:
        gap = round(100 * (mean["fp32"] - mean["1bit"]), 2)
        out["1bit_accuracy_gap_points"] = gap
        out["1bit_within_1.5_points"] = gap <= 1.5
    if "fp32" in mean and "1bit-bihead" in mean:
        out["1bit-bihead_accuracy_gap_points"] = round(
            100 * (mean["fp32"] - mean["1bit-bihead"]), 2
        )
    limits = {}
    for v in nbytes:
        limit = size_limit(bound[v])
        limits[v] = {
            "bytes": nbytes[v],
            "limit": int(limit),
            "ok": nbytes[v] <= limit,
            "weights_file_bytes": result["weights_file_bytes"][v],
            "weights_file_ok": result["weights_file_bytes"][v] <= limit,
        }
    out["on_disk_le_1.03_bound_plus_2KiB"] = limits
    out["fp32_over_1bit_bytes"] = round(nbytes["fp32"] / nbytes["1bit"], 2)
    out["fp32_over_1bit-bihead_bytes"] = round(nbytes["fp32"] / nbytes["1bit-bihead"], 2)
    out["1bit-bihead_25x_smaller"] = nbytes["fp32"] / nbytes["1bit-bihead"] >= 25
    return out


_SELECTION = ("tasks", "variants", "seeds", "variant_methods")


def _reusable(old: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """Runs of an earlier result file made with the same training settings and variant."""
    now = json.loads(json.dumps(settings))
    before = old.get("settings", {})
    if {k: v for k, v in before.items() if k not in _SELECTION} != {
        k: v for k, v in now.items() if k not in _SELECTION
    }:
        return {}
    same = before.get("variant_methods", {})
    return {
        key: r
        for key, r in old.get("runs", {}).items()
        if r.get("variant") in now["variant_methods"]
        and same.get(r["variant"]) == now["variant_methods"][r["variant"]]
        and r.get("task") in now["tasks"]
        and r.get("seed") in now["seeds"]
    }


def run(
    quick: bool = False,
    out: str | Path | None = None,
    *,
    tasks: list[str] | None = None,
    variants: list[str] | None = None,
    seeds: list[int] | None = None,
    epochs: int | None = None,
    settings: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the benchmark, write the JSON (``benchmarks/results/lowbit[_quick].json`` or
    ``out``), print it and return it.

    Args:
        quick: 2 tasks x {fp32, 1bit} x 1 seed (about 10 minutes on 2 CPU cores).
        out: JSON file to write.
        tasks, variants, seeds, epochs: override the chosen preset's values.
        settings: other preset values to override (``image_size``, ``n_train``, ``lr``, ...).
        progress: print one line per finished run.
    """
    from slimtune.app.loop import train

    overrides = settings or {}
    settings = dict(QUICK if quick else FULL)
    unknown_keys = sorted(set(overrides) - set(settings))
    if unknown_keys:
        raise ValueError(f"unknown setting(s) {unknown_keys}; known: {sorted(settings)}")
    settings.update(overrides)
    for key, value in (("tasks", tasks), ("variants", variants), ("seeds", seeds)):
        if value is not None:
            settings[key] = list(value)
    if epochs is not None:
        settings["epochs"] = int(epochs)
    unknown = [v for v in settings["variants"] if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; known: {list(VARIANTS)}")
    bad = [t for t in settings["tasks"] if t not in TASKS]
    if bad:
        raise ValueError(f"unknown task(s) {bad}; known: {list(TASKS)}")
    settings["variant_methods"] = {v: VARIANTS[v] for v in settings["variants"]}
    path = Path(out) if out else DEFAULT_OUT / ("lowbit_quick.json" if quick else "lowbit.json")
    result: dict[str, Any] = {
        "benchmark": "lowbit",
        "quick": quick,
        "settings": settings,
        "machine": _machine(),
        "runs": {},
    }
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            old = {}
        result["runs"] = _reusable(old, settings)
    t_start = time.perf_counter()
    todo = [
        (t, v, s)
        for s in settings["seeds"]
        for v in settings["variants"]
        for t in settings["tasks"]
    ]
    with tempfile.TemporaryDirectory(prefix="slimtune-lowbit-") as tmp_name:
        tmp = Path(tmp_name)
        for i, (task, variant, seed) in enumerate(todo):
            key = f"{task}/{variant}/{seed}"
            if key in result["runs"]:
                continue
            cfg = _config(settings, task, variant, seed)
            run_dir = tmp / key.replace("/", "-")
            t0 = time.perf_counter()
            res = train(cfg, run_dir, progress=False)
            result["runs"][key] = {
                "task": task,
                "variant": variant,
                "seed": seed,
                "val_acc": res["val"]["accuracy"],
                "test_acc": res["test"]["accuracy"],
                "best_epoch": res["val"]["best_epoch"],
                "trainable_params": res["trainable_params"],
                "train_s": round(res["train_s"], 1),
                "run_s": round(time.perf_counter() - t0, 1),
                "sizes": adapter_sizes(run_dir / "adapter"),
            }
            path.parent.mkdir(parents=True, exist_ok=True)
            _write(path, result)
            if progress:
                r = result["runs"][key]
                print(
                    f"[{i + 1}/{len(todo)}] {key}: val {r['val_acc']:.3f}  test "
                    f"{r['test_acc']:.3f}  {r['sizes']['bytes']:,} B  ({r['run_s']:.0f} s)",
                    flush=True,
                )
        _summarise(result, settings, tmp)
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    _write(path, result)
    print(json.dumps({k: result[k] for k in result if k != "runs"}, indent=1))
    return result


def main(argv: list[str] | None = None) -> int:
    """``slimtune bench lowbit [--quick] [--out FILE]``."""
    from benchmarks.common import quick_out_main

    return quick_out_main("slimtune bench lowbit", __doc__.splitlines()[0], run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
