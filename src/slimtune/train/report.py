"""Run reports: ``report.md`` and ``curves.png`` (loss and accuracy per epoch)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..io import atomic_write, atomic_write_text

__all__ = ["write_report", "plot_curves"]


def _metrics(run: Path) -> list[dict[str, Any]]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [
        json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]


def plot_curves(run: Path) -> Path | None:
    """Plot training/validation loss and validation accuracy per epoch into ``curves.png``."""
    rows = _metrics(run)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    a.plot(ep, [r["train_loss"] for r in rows], "o-", label="train")
    a.plot(ep, [r["val_loss"] for r in rows], "s-", label="val")
    a.set_xlabel("epoch")
    a.set_ylabel("loss")
    a.legend()
    b.plot(ep, [r["val_accuracy"] for r in rows], "o-", color="C2")
    b.set_xlabel("epoch")
    b.set_ylabel("val accuracy")
    b.set_ylim(0, 1)
    fig.suptitle(run.name)
    fig.tight_layout()
    out = run / "curves.png"
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return out


def write_report(run: Path, results: dict[str, Any]) -> None:
    """Write ``report.md`` (and ``curves.png``) for a finished run."""
    plot_curves(run)
    rows = _metrics(run)
    lines = [
        f"# {results['name']}: {results['method']} on {results['model']} / {results['task']}",
        "",
        "| trainable params | % of base | val accuracy | test accuracy | train s |",
        "|---:|---:|---:|---:|---:|",
        f"| {results['trainable_params']:,} | {results['trainable_pct']:.3f}% | "
        f"{results['val']['accuracy']:.4f} | {results['test']['accuracy']:.4f} | {results['train_s']:.1f} |",
        "",
        "Trainable parameters per method: "
        + ", ".join(f"{k} {v:,}" for k, v in sorted(results.get("by_method", {}).items())),
        "",
        f"Best validation epoch: {results['val'].get('best_epoch')} (model selected on validation; test reported once).",
        "",
        "| epoch | train loss | val loss | val accuracy |",
        "|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['epoch']} | {r['train_loss']:.4f} | {r['val_loss']:.4f} | {r['val_accuracy']:.4f} |"
        for r in rows
    ]
    lines += ["", "![curves](curves.png)", ""]
    if results.get("pruning"):
        from .prune import report_lines

        lines += report_lines(results["pruning"])
    atomic_write_text(run / "report.md", "\n".join(lines))
