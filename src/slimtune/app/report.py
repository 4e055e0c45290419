"""Run reports: ``report.md`` and ``curves.png`` (loss and accuracy per epoch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..io import atomic_write_text
from .plots import metrics_rows, plot_curves

__all__ = ["write_report"]


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
    atomic_write_text(run / "report.md", "\n".join(lines))
