"""Run reports: ``report.md`` and ``curves.png`` (loss and accuracy per epoch)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..io import MANIFEST, atomic_write_text, storage_report
from ..io.files import group_file
from .plots import metrics_rows, plot_curves

__all__ = ["write_report", "task_summary", "task_lines", "majority_baseline"]


def _labels(ds: Any) -> list[int]:
    given = getattr(ds, "labels", None)
    if given is not None:
        return [int(x) for x in given]
    return [int(ds[i]["labels"]) for i in range(len(ds))]


def majority_baseline(data: Any) -> dict[str, Any]:
    """Accuracy of always predicting the training set's most frequent class (a classification
    task's floor: a method that does not beat it has learnt nothing)."""
    from collections import Counter

    train = Counter(_labels(data.train))
    cls = max(sorted(train), key=lambda c: train[c])
    out: dict[str, Any] = {"class": data.class_names[cls] if data.class_names else cls}
    for split in ("val", "test"):
        labels = _labels(getattr(data, split))
        out[split] = sum(1 for y in labels if y == cls) / max(1, len(labels))
    return out


def task_summary(adapter: Path) -> dict[str, Any]:
    """Bytes of a saved adapter (task file) per part and its tensors' bit widths."""
    rep = storage_report(adapter)
    manifest = json.loads(group_file(adapter, MANIFEST).read_text(encoding="utf-8"))
    tensors = [
        {
            "name": e["name"],
            "count": len(e.get("each", [0])),
            "method": e.get("method", "other"),
            "shape": e.get("shape"),
            "bits": int(e.get("bits", 32)),
        }
        for e in manifest.get("tensors", [])
    ]
    pruned = manifest.get("pruned")
    return {
        "bytes": rep["total_disk_bytes"],
        "files": rep["disk_bytes"],
        "parts": rep["parts"],
        "header_bytes": rep["header_bytes"],
        "pruned": pruned is not None,
        "shifted_linears": len(pruned.get("shift", [])) if pruned else 0,
        "tensors": tensors,
    }


def task_lines(task: dict[str, Any]) -> list[str]:
    """The task file section of ``report.md``: bytes per part, bits per tensor."""
    lines = [
        "## Task file (`adapter/`)",
        "",
        f"{task['bytes']:,} bytes on disk"
        + (
            ", everything that turns the original base into this model (pruning included)."
            if task["pruned"]
            else "."
        ),
        "",
        "| part | bytes |",
        "|---|---:|",
        *(f"| {k} | {v:,} |" for k, v in sorted(task["parts"].items())),
        f"| manifest and headers | {task['header_bytes']:,} |",
        "",
        "| tensor | count | method | shape | bits |",
        "|---|---:|---|---|---:|",
        *(
            f"| `{t['name']}` | {t['count']} | {t['method']} | {t['shape']} | {t['bits']} |"
            for t in task["tensors"]
        ),
        "",
    ]
    return lines


def write_report(run: Path, results: dict[str, Any]) -> None:
    """Write ``report.md`` (and ``curves.png``) for a finished run."""
    plot_curves(
        run, f"{results['name']}: {results['method']} on {results['model']} / {results['task']}"
    )
    rows = metrics_rows(run)
    metric = str(results.get("metric", "accuracy"))
    name = metric.replace("_", " ")
    lines = [
        f"# {results['name']}: {results['method']} on {results['model']} / {results['task']}",
        "",
        f"| trainable params | % of base | val {name} | test {name} | train s |",
        "|---:|---:|---:|---:|---:|",
        f"| {results['trainable_params']:,} | {results['trainable_pct']:.3f}% | "
        f"{results['val']['accuracy']:.4f} | {results['test']['accuracy']:.4f} | {results['train_s']:.1f} |",
        "",
        *(
            [
                f"Majority-class baseline (always {results['majority']['class']!r}): val "
                f"{results['majority']['val']:.4f}, test {results['majority']['test']:.4f}.",
                "",
            ]
            if results.get("majority")
            else []
        ),
        "Trainable parameters per method: "
        + ", ".join(f"{k} {v:,}" for k, v in sorted(results.get("by_method", {}).items())),
        "",
        f"Best validation epoch: {results['val'].get('best_epoch')} (model selected on validation; test reported once).",
        "",
        f"| epoch | train loss | val loss | val {name} |",
        "|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['epoch']} | {r['train_loss']:.4f} | {r['val_loss']:.4f} | {r[f'val_{metric}']:.4f} |"
        for r in rows
    ]
    lines += ["", "![curves](curves.png)", ""]
    if results.get("pruning"):
        from .prune import report_lines

        lines += report_lines(results["pruning"])
    if results.get("allocation"):
        from .allocate import report_lines as allocation_lines

        lines += allocation_lines(results["allocation"])
    if results.get("task"):
        lines += task_lines(results["task"])
    atomic_write_text(run / "report.md", "\n".join(lines))
