"""SPT-LoRA / SPT-Adapter against LoRA, Adapter, a linear probe and full fine-tuning.

Setup: ``dinov2-s`` (DINOv2-S/14, 22M parameters) with a new linear head on VTAB-1k-style tasks
(800 training and 200 validation images drawn from the training split, test on the test split).
Every run goes through the trainer (:func:`slimtune.app.loop.train`) with a run config built
here: AdamW, cosine schedule with 10% warm-up, weight decay 1e-4 (none on 1-D tensors), no
augmentation; the epoch with the best validation accuracy is kept and its *test* accuracy is
reported (the paper reports the best test accuracy over epochs and budgets instead).

Equal budget::

    LoRA r=8 on q,v of every block (alpha = r: no scaling, as in the paper)  ─> B parameters
    SPT-LoRA / SPT-Adapter: allocation budget = B (the pass lands within 1% of it)
    Adapter (sequential, after fc2): the bottleneck width whose count is closest to B

Counts exclude the task head, which every method trains. Each run is a fresh ``spawn``
subprocess, so that memory numbers are the method's own:

* ``peak_mem_mb``: peak while *training* (build, SPT pass and data loading excluded). On CUDA
  ``torch.cuda.max_memory_allocated`` reset once the model is built; on CPU (Linux) the RSS
  high-water mark ``VmHWM`` reset through ``/proc/self/clear_refs`` once the model is built
  (after ``malloc_trim``, so that memory freed by the SPT pass is not counted for training).
  On CPU it includes the interpreter, libraries, weights and data (the same for every method),
  so ``peak_growth_mb`` (peak minus the RSS right before training) is reported too.
* ``peak_process_mb``: the whole subprocess's peak (``ru_maxrss``; includes the SPT pass).

``sensitivity_s`` is the whole SPT pass (squared gradients over the sensitivity batches plus
the allocation), ``train_s`` the trainer's training time (evaluation excluded) of the same runs.

Finished runs are appended to ``<out>.runs.jsonl``; running again with the same settings skips
them (resume). Run ``slimtune bench spt [--quick] [--out FILE]``.
"""

from __future__ import annotations

import copy
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["METHODS", "FULL", "QUICK", "run", "summarise", "format_table"]

METHODS = ("linear", "full", "lora", "adapter", "spt-lora", "spt-adapter")
MODEL = "dinov2-s"
RESULTS = Path("benchmarks") / "results"
LORA_R = 8
LORA_TARGETS = ("q", "v")

FULL: dict[str, Any] = {
    "tasks": ["fashion-mnist", "mnist-5k", "digits", "shapes-count", "shapes-position"],
    "methods": list(METHODS),
    "seeds": [0, 1, 2],
    "image_size": 56,
    "n_train": 800,
    "n_val": 200,
    "n_test": 1000,
    "epochs": 20,
    "batch_size": 32,
    "lr": {"linear": 1e-2, "full": 1e-4, "default": 1e-3},
    "sensitivity_batches": 16,
    "sensitivity_batch_size": 32,
}
"""The full benchmark (hours on 2 CPU cores; minutes on a GPU)."""

QUICK: dict[str, Any] = {
    **FULL,
    "tasks": ["digits", "shapes-count"],
    "methods": ["lora", "spt-lora"],
    "seeds": [0],
    "image_size": 42,
    "n_test": 500,
    "epochs": 5,
    "sensitivity_batches": 4,
}
"""``--quick``: 2 tasks x {lora, spt-lora} x 1 seed, within 10 minutes on 2 CPU cores."""


def _reset_peak() -> dict[str, float]:
    """Free what can be freed, note the current memory and restart the peak from here."""
    from benchmarks.memory import reset_peak

    mark = reset_peak()
    out = {"before_train_mb": mark["before_mb"]}
    if "previous_peak_mb" in mark:
        out["build_peak_mb"] = mark["previous_peak_mb"]
    return out


def method_config(method: str, budget: int, adapter_dim: int, setup: dict[str, Any]) -> dict:
    """The ``methods``/``allocation`` part of a run config for one benchmark method."""
    if method == "linear":
        return {"methods": [{"name": "linear"}]}
    if method == "full":
        return {"methods": [{"name": "full", "targets": ["param:.*"]}]}
    if method == "lora":
        lora = {"name": "lora", "r": LORA_R, "alpha": float(LORA_R), "targets": list(LORA_TARGETS)}
        return {"methods": [lora]}
    if method == "adapter":
        return {"methods": [{"name": "adapter", "dim": adapter_dim}]}
    if method in ("spt-lora", "spt-adapter"):
        allocation = {
            "method": "spt",
            "budget": budget,
            "structured": method.split("-", 1)[1],
            "r": LORA_R,
            "lora_alpha": float(LORA_R),
            "batches": setup["sensitivity_batches"],
            "batch_size": setup["sensitivity_batch_size"],
        }
        return {"methods": [], "allocation": allocation}
    raise ValueError(f"unknown benchmark method {method!r}; valid: {', '.join(METHODS)}")


def _child(spec: dict[str, Any], result_path: str) -> None:
    """One training run in a fresh process; writes its record to ``result_path``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(spec["threads"])
    from slimtune import core
    from slimtune.app import loop
    from slimtune.app.config import RunConfig

    marks: dict[str, Any] = {}
    build = loop.build_run

    def build_then_mark(cfg: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        run = build(cfg, **kwargs)
        marks["build_s"] = time.perf_counter() - t0
        summary = core.summary(run.model)
        marks["params"] = summary.trainable - summary.by_method.get("head", 0)
        marks["params_with_head"] = summary.trainable
        plan = core.get_state(run.model).plan
        if "spt" in plan.meta:
            spt = plan.meta["spt"]
            marks["spt"] = {
                k: spt[k]
                for k in ("budget", "total", "tau", "sensitivity_s", "scores_s")
                if k in spt
            }
        marks.update(_reset_peak())
        return run

    loop.build_run = build_then_mark  # measurement hook of this subprocess only
    cfg = RunConfig(**spec["config"])
    results = loop.train(cfg, spec["run_dir"], progress=False)
    from benchmarks.memory import peak_mb

    peak = peak_mb()
    record = {
        "task": spec["task"],
        "method": spec["method"],
        "seed": spec["seed"],
        "test_acc": results["test"]["accuracy"],
        "val_acc": results["val"]["accuracy"],
        "best_epoch": results["val"]["best_epoch"],
        "train_s": results["train_s"],
        "peak_mem_mb": peak,
        "peak_growth_mb": peak - marks.get("before_train_mb", 0.0),
        "peak_process_mb": max(  # clear_refs resets ru_maxrss too: add the build's peak
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, marks.get("build_peak_mb", 0)
        ),
        "device": results["device"],
        **marks,
    }
    Path(result_path).write_text(json.dumps(record), encoding="utf-8")


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one (task, method, seed) in a ``spawn`` subprocess and return its record."""
    with tempfile.TemporaryDirectory(prefix="slimtune-bench-spt-") as tmp:
        spec = {**spec, "run_dir": str(Path(tmp) / "run")}
        result_path = str(Path(tmp) / "record.json")
        proc = mp.get_context("spawn").Process(target=_child, args=(spec, result_path))
        proc.start()
        proc.join()
        if proc.exitcode != 0 or not Path(result_path).is_file():
            raise RuntimeError(
                f"benchmark run {spec['task']}/{spec['method']}/seed {spec['seed']} failed "
                f"(exit code {proc.exitcode}); its traceback is printed above"
            )
        return json.loads(Path(result_path).read_text(encoding="utf-8"))


def equal_budget(image_size: int) -> tuple[int, int, dict[str, int]]:
    """LoRA's parameter count (the budget) and the adapter width closest to it.

    Counted by applying the methods to ``dinov2-s`` (head excluded); nothing is hard-coded.
    """
    import slimtune
    from slimtune.models.loader import load_model

    del image_size  # counts do not depend on the resolution
    base, _ = load_model(MODEL, 2)

    def count(method: Any) -> int:
        model = slimtune.apply(copy.deepcopy(base), method)
        s = slimtune.summary(model)
        return s.trainable - s.by_method.get("head", 0)

    budget = count(slimtune.LoRA(r=LORA_R, alpha=float(LORA_R), targets=LORA_TARGETS))
    one, two = count(slimtune.Adapter(dim=1)), count(slimtune.Adapter(dim=2))
    per_dim = two - one
    dim = max(1, round((budget - (one - per_dim)) / per_dim))
    counts = {"lora": budget, "adapter": one + (dim - 1) * per_dim}
    return budget, dim, counts


def _mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else float("nan")


def summarise(records: list[dict[str, Any]], setup: dict[str, Any]) -> dict[str, Any]:
    """Aggregate run records into the benchmark's JSON (see :func:`run`)."""
    tasks = [t for t in setup["tasks"] if any(r["task"] == t for r in records)]
    methods = [m for m in setup["methods"] if any(r["method"] == m for r in records)]

    def pick(task: str | None, method: str) -> list[dict[str, Any]]:
        return [r for r in records if r["method"] == method and (task is None or r["task"] == task)]

    acc: dict[str, dict[str, float]] = {}
    acc_std: dict[str, dict[str, float]] = {}
    val: dict[str, dict[str, float]] = {}
    for t in tasks:
        acc[t], acc_std[t], val[t] = {}, {}, {}
        for m in methods:
            rs = pick(t, m)
            if not rs:
                continue
            tests = [r["test_acc"] for r in rs]
            acc[t][m] = round(_mean(tests), 4)
            acc_std[t][m] = round(statistics.pstdev(tests), 4) if len(tests) > 1 else 0.0
            val[t][m] = round(_mean([r["val_acc"] for r in rs]), 4)
    mean = {
        m: round(_mean([acc[t][m] for t in tasks if m in acc[t]]), 4)
        for m in methods
        if all(m in acc[t] for t in tasks)
    }
    out: dict[str, Any] = {
        "acc": acc,
        "mean": mean,
        "params": {m: int(_mean([r["params"] for r in pick(None, m)])) for m in methods},
        "train_s": {m: round(_mean([r["train_s"] for r in pick(None, m)]), 2) for m in methods},
        "peak_mem_mb": {m: round(max(r["peak_mem_mb"] for r in pick(None, m)), 1) for m in methods},
        "peak_growth_mb": {
            m: round(max(r["peak_growth_mb"] for r in pick(None, m)), 1) for m in methods
        },
        "peak_process_mb": {
            m: round(max(r["peak_process_mb"] for r in pick(None, m)), 1) for m in methods
        },
        "acc_std": acc_std,
        "val_acc": val,
    }
    spt_runs = [r for r in records if "spt" in r]
    if spt_runs:
        sens = [r["spt"]["sensitivity_s"] for r in spt_runs]
        out["sensitivity_s"] = round(_mean(sens), 2)
        out["sensitivity_scores_s"] = round(
            _mean([r["spt"].get("scores_s", 0) for r in spt_runs]), 2
        )
        out["sensitivity_pct_of_train"] = round(
            100 * _mean([r["spt"]["sensitivity_s"] / r["train_s"] for r in spt_runs]), 2
        )
        out["plan_error_pct"] = round(
            max(abs(r["spt"]["total"] - r["spt"]["budget"]) / r["spt"]["budget"] for r in spt_runs)
            * 100,
            3,
        )
    if "lora" in methods and "spt-lora" in methods:
        out["mem_ratio_spt_lora_vs_lora"] = round(
            out["peak_mem_mb"]["spt-lora"] / out["peak_mem_mb"]["lora"], 4
        )
        out["mem_growth_ratio_spt_lora_vs_lora"] = round(
            out["peak_growth_mb"]["spt-lora"] / out["peak_growth_mb"]["lora"], 4
        )
        if "spt-lora" in mean and "lora" in mean:
            out["spt_lora_minus_lora_points"] = round(100 * (mean["spt-lora"] - mean["lora"]), 2)
    if "full" in mean:
        out["minus_full_points"] = {
            m: round(100 * (mean[m] - mean["full"]), 2) for m in mean if m != "full"
        }
    return out


def _key(r: dict[str, Any]) -> str:
    return f"{r['task']}/{r['method']}/{r['seed']}"


def _load_done(path: Path, setup: dict[str, Any]) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    done = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by an interrupted write
        if r.get("setup") == _setup_id(setup):
            done.append(r)
    return done


def _setup_id(setup: dict[str, Any]) -> str:
    keys: tuple[str, ...] = ("image_size", "n_train", "n_val", "n_test", "epochs", "batch_size")
    keys += ("lr", "sensitivity_batches", "sensitivity_batch_size")
    return json.dumps({k: setup[k] for k in keys}, sort_keys=True)


def run(
    quick: bool = False, out: str | None = None, setup: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run the benchmark, print a table and the JSON, save the JSON and return it.

    Args:
        quick: :data:`QUICK` instead of :data:`FULL`.
        out: JSON path; default ``benchmarks/results/spt_quick.json`` or ``spt.json``.
        setup: overrides of :data:`FULL`/:data:`QUICK` (tasks, methods, seeds, epochs, ...).

    Returns:
        ``{"acc": {task: {method: mean test accuracy}}, "mean": {method: ...},
        "params": {method: trainable parameters without the head}, "sensitivity_s",
        "train_s": {method: ...}, "peak_mem_mb": {method: ...}, ...}`` with ``setup``,
        ``machine`` and every run's record under ``runs``.
    """
    import torch

    from benchmarks.common import cores, emit, machine_info

    setup = {**(QUICK if quick else FULL), **(setup or {})}
    bad = [m for m in setup["methods"] if m not in METHODS]
    if bad:
        raise ValueError(f"unknown benchmark methods {bad}; valid: {', '.join(METHODS)}")
    path = Path(out) if out else RESULTS / ("spt_quick.json" if quick else "spt.json")
    log = path.with_name(path.name + ".runs.jsonl")
    t_start = time.perf_counter()
    budget, adapter_dim, counts = equal_budget(setup["image_size"])
    print(
        f"equal budget: LoRA r={LORA_R} on {','.join(LORA_TARGETS)} = {budget:,} parameters; "
        f"adapter dim {adapter_dim} = {counts['adapter']:,}; SPT budget {budget:,}",
        file=sys.stderr,
    )
    records = _load_done(log, setup)
    done = {_key(r) for r in records}
    jobs = [(t, m, s) for s in setup["seeds"] for t in setup["tasks"] for m in setup["methods"]]
    for i, (task, method, seed) in enumerate(jobs):
        key = f"{task}/{method}/{seed}"
        if key in done:
            continue
        lrs = setup["lr"]
        config = {
            "name": f"{method}-{task}-{seed}",
            "model": MODEL,
            "task": task,
            **method_config(method, budget, adapter_dim, setup),
            "data": {
                "image_size": setup["image_size"],
                "n_train": setup["n_train"],
                "n_val": setup["n_val"],
                "n_test": setup["n_test"],
            },
            "train": {
                "epochs": setup["epochs"],
                "batch_size": setup["batch_size"],
                "lr": lrs.get(method, lrs["default"]),
                "seed": seed,
            },
        }
        spec = {"task": task, "method": method, "seed": seed, "config": config}
        spec["threads"] = cores()
        t0 = time.perf_counter()
        record = run_one(spec)
        record["wall_s"] = time.perf_counter() - t0
        record["setup"] = _setup_id(setup)
        records.append(record)
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        print(
            f"[{i + 1}/{len(jobs)}] {key}: test {record['test_acc']:.4f} val "
            f"{record['val_acc']:.4f} params {record['params']:,} train {record['train_s']:.1f}s "
            f"peak {record['peak_mem_mb']:.0f} MB (+{record['peak_growth_mb']:.0f}) "
            f"wall {record['wall_s']:.0f}s",
            file=sys.stderr,
            flush=True,
        )
    result = summarise(records, setup)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result["budget"] = budget
    result["adapter_dim"] = adapter_dim
    result["setup"] = {
        **setup,
        "model": MODEL,
        "lora": {"r": LORA_R, "alpha": float(LORA_R), "targets": list(LORA_TARGETS)},
        "spt": {"r": LORA_R, "lora_alpha": float(LORA_R), "alpha": 10.0, "beta": 5.0},
        "protocol": "best epoch on validation, its test accuracy; fractions in [0, 1]",
        "peak_mem_method": "cuda max_memory_allocated after build"
        if device.type == "cuda"
        else "VmHWM reset after build (malloc_trim first); fresh spawn subprocess per run",
    }
    result["machine"] = machine_info(device)
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    result["runs"] = sorted(records, key=_key)
    print(format_table(result), file=sys.stderr)
    emit(result, path)
    return result


def format_table(result: dict[str, Any]) -> str:
    """Test accuracy per task and method, then parameters, time and memory per method."""
    acc, methods = result["acc"], list(result["params"])
    rows = [f"{'task':<16}" + "".join(f"{m:>12}" for m in methods)]
    for t, by in acc.items():
        rows.append(f"{t:<16}" + "".join(f"{by.get(m, float('nan')):>12.4f}" for m in methods))
    rows.append(
        f"{'mean':<16}" + "".join(f"{result['mean'].get(m, float('nan')):>12.4f}" for m in methods)
    )
    rows.append(f"{'params':<16}" + "".join(f"{result['params'][m]:>12,}" for m in methods))
    rows.append(f"{'train s':<16}" + "".join(f"{result['train_s'][m]:>12.1f}" for m in methods))
    rows.append(f"{'peak MB':<16}" + "".join(f"{result['peak_mem_mb'][m]:>12.0f}" for m in methods))
    rows.append(
        f"{'peak growth MB':<16}"
        + "".join(f"{result['peak_growth_mb'][m]:>12.0f}" for m in methods)
    )
    if "sensitivity_s" in result:
        rows.append(
            f"SPT pass {result['sensitivity_s']:.1f}s = {result['sensitivity_pct_of_train']:.1f}% "
            f"of training; plan within {result['plan_error_pct']:.3f}% of the budget"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """``slimtune bench spt [--quick] [--out FILE]``."""
    from benchmarks.common import quick_out_main

    return quick_out_main("slimtune bench spt", __doc__.splitlines()[0], run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
