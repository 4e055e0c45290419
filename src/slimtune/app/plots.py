"""Figures of runs and passes: training curves, Light-PEFT pruning per block, SPT allocation.

matplotlib is imported inside each function (the Agg backend), so importing this module is cheap.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from ..core import family_of
from ..io import atomic_write
from ..passes.lightpeft import PruningDecision
from ..plan import Plan

__all__ = ["metrics_rows", "plot_allocation", "plot_curves", "plot_pruning"]


def metrics_rows(run: Path) -> list[dict[str, Any]]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [
        json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]


def _step_rows(run: Path) -> list[dict[str, Any]]:
    path = run / "steps.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def plot_curves(run: Path, title: str | None = None) -> Path | None:
    """Plot training/validation loss and the validation score (accuracy, or exact match for a
    generation task) per epoch into ``curves.png``, with every step's training loss
    (``steps.jsonl``) under the per-epoch means."""
    rows = metrics_rows(run)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    steps = _step_rows(run)
    if steps:  # every step's loss, thin, under the per-epoch means
        a.plot(
            [r["epoch"] + 1 for r in steps],
            [r["loss"] for r in steps],
            "-",
            color="C0",
            alpha=0.3,
            lw=0.8,
            label="train (steps)",
        )
    a.plot(ep, [r["train_loss"] for r in rows], "o-", label="train")
    a.plot(ep, [r["val_loss"] for r in rows], "s-", label="val")
    a.set_xlabel("epoch")
    a.set_ylabel("loss")
    a.legend()
    scores = [k for k in rows[0] if k.startswith("val_") and k != "val_loss"]
    metric = "val_accuracy" if "val_accuracy" in scores else (scores or ["val_accuracy"])[0]
    b.plot(ep, [r.get(metric, float("nan")) for r in rows], "o-", color="C2")
    b.set_xlabel("epoch")
    b.set_ylabel(metric.replace("_", " "))
    b.set_ylim(0, 1)
    fig.suptitle(title or run.name)
    fig.tight_layout()
    out = run / "curves.png"
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return out


def plot_pruning(decision: PruningDecision, path: str | Path, title: str = "") -> Path:
    """Bar charts per block: heads, FFN neurons, LoRA modules and ranks kept vs removed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = list(decision.heads)
    x = list(range(len(blocks)))
    hk = [len(decision.heads[b]) for b in blocks]
    hb = [decision.before[b]["heads"] for b in blocks]
    nk = [len(decision.neurons[b]) for b in blocks]
    nb = [decision.before[b]["ffn"] for b in blocks]

    def owner(module: str) -> int:
        hits = [i for i, b in enumerate(blocks) if module.startswith(b + ".")]
        return hits[-1] if hits else -1

    rk = [0] * len(blocks)
    rb = [0] * len(blocks)
    for name, r in decision.lora_before.items():
        i = owner(name)
        if i >= 0:
            rb[i] += r
            rk[i] += len(decision.ranks.get(name, []))
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, kept, before, label in (
        (axes[0], hk, hb, "attention heads"),
        (axes[1], nk, nb, "FFN neurons"),
        (axes[2], rk, rb, "LoRA ranks"),
    ):
        ax.bar(x, kept, color="C0", label="kept")
        ax.bar(
            x,
            [b - k for k, b in zip(kept, before, strict=True)],
            bottom=kept,
            color="C3",
            alpha=0.5,
            label="pruned",
        )
        ax.set_xticks(x[:: max(1, -(-len(x) // 15))])  # at most 15 labels (30-layer models)
        ax.set_xlabel("block")
        ax.set_title(label)
    axes[0].legend()
    fig.suptitle(title or "Light-PEFT pruning per block")
    fig.tight_layout()
    out = Path(path)
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return out


def plot_allocation(plan: Plan, model: nn.Module, out: str) -> None:
    """Heatmap of layers x roles: sparse counts (colour) and structured matrices (marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    family = family_of(model)
    counts = plan.meta["spt"]["counts"]
    roles = [r for r in family.candidate_roles if r in family.roles]
    blocks = family.block_names(model)
    grid = np.zeros((len(blocks), len(roles)))
    marks: list[tuple[int, int, str]] = []
    for name, c in counts.items():
        module = name.rpartition(".")[0]
        for j, role in enumerate(roles):
            if module in family.role_names(model, role):
                i = next((k for k, b in enumerate(blocks) if module.startswith(b + ".")), None)
                if i is None:
                    continue
                if c["kind"] == 1:
                    marks.append((i, j, "L" if plan.meta["spt"]["structured"] == "lora" else "A"))
                else:
                    grid[i, j] = c["count"]
    fig, ax = plt.subplots(figsize=(1.1 * len(roles) + 2, 0.35 * len(blocks) + 1.5))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    for i, j, m in marks:
        ax.text(j, i, m, ha="center", va="center", color="red", fontweight="bold")
    ax.set_xticks(range(len(roles)), roles)
    ax.set_yticks(range(len(blocks)), [str(i) for i in range(len(blocks))])
    ax.set_xlabel("role")
    ax.set_ylabel("layer")
    fig.colorbar(im, ax=ax, label="sparse positions")
    s = plan.meta["spt"]
    ax.set_title(
        f"SPT-{s['structured']}: {s['total']:,} params (budget {s['budget']:,}); L/A = structured"
    )
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
