"""Light-PEFT's speed/accuracy trade-off from the saved results: one point per setting.

x: speedup over LoRA q, v (median of the per-round ratios, with its 95% interval, from the
timing runs); y: test accuracy minus lora-qv's, mean over the seeds (bars: the lowest and
highest seed). Run from the repository root: ``python -m benchmarks.plot_lightpeft_tradeoff``
-> ``benchmarks/results/lightpeft_tradeoff.png`` (minilm, quick mode, by pruning ratio) and
``lightpeft_tradeoff_full.png`` (dinov2-s, full mode, by ratio, score and compensation;
timings from ``benchmarks/lightpeft_timing.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
POINTS = (  # label, timing run, summary key in lightpeft_quick_seeds.json
    ("1/3 (paper)", "lightpeft_quick_30rounds.json", "summary_lora_qv_vs_light_peft_early_0.35"),
    ("0.45", "lightpeft_quick_ratio0.45_30rounds.json", "summary_lora_qv_vs_light_peft_0.45"),
    ("1/2", "lightpeft_quick_half_30rounds.json", "summary_lora_qv_vs_light_peft_half_early_0.35"),
)


FULL = {  # model: timing file, [(label, seeds file, name of its architecture in the timing)]
    "dinov2-s / fashion-mnist": (
        "lightpeft_timing_dinov2_ffn0.5.json",
        [
            ("masks, 1/3 (paper)", "lightpeft_full_dinov2_seeds.json", "paper"),
            ("taylor, 1/3", "lightpeft_full_dinov2_seeds_taylor.json", "paper"),
            ("masks, 1/3, compensated", "lightpeft_full_dinov2_seeds_compensate.json", "paper"),
            ("taylor, FFN 1/2", "lightpeft_full_dinov2_seeds_taylor_ffn0.5.json", "taylor-ffn0.5"),
            (
                "taylor, FFN 1/2, compensated",
                "lightpeft_full_dinov2_seeds_taylor_ffn0.5_compensate.json",
                "taylor-ffn0.5",
            ),
            ("taylor, 1/2", "lightpeft_full_dinov2_seeds_taylor_half.json", "half"),
        ],
    ),
}


def _point(ax: Any, c: dict[str, float], mean: float, deltas: list[float], label: str) -> None:
    """One setting: the paired speedup ``c`` with its interval, the mean accuracy difference
    with bars from the worst to the best seed."""
    ax.errorbar(
        c["median"],
        mean,
        xerr=[[c["median"] - c["low"]], [c["high"] - c["median"]]],
        yerr=[[mean - min(deltas)], [max(deltas) - mean]],
        fmt="o",
        capsize=3,
        label=label,
    )


def _axes(row: Any) -> None:
    """The targets (dashed: 1.5x; dotted: -1 point), labels and grid of a training/inference pair."""
    for ax, what in zip(row, ("training", "inference (LoRA merged)"), strict=True):
        ax.axvline(1.5, color="grey", ls="--", lw=1)
        ax.axhline(-1.0, color="grey", ls=":", lw=1)
        ax.set_xlabel(f"{what} speedup over LoRA q, v")
        ax.grid(alpha=0.3)


def _save(fig: Any, title: str, suffix: str) -> None:
    fig.suptitle(title)
    fig.tight_layout()
    out = RESULTS / f"lightpeft_tradeoff{suffix}.png"
    fig.savefig(out, dpi=110)
    print(f"saved {out}")


def _light_peft_deltas(path: Path) -> list[float] | None:
    """Per-seed light-peft minus lora-qv, in points, from a seeds file."""
    doc = json.loads(path.read_text())
    diff = doc.get("summary", {}).get("light-peft_minus_lora_qv")
    return [100 * d for d in diff["per_seed"]] if diff else None


def full() -> None:
    fig, axes = plt.subplots(len(FULL), 2, figsize=(11, 4.2 * len(FULL)), squeeze=False)
    for row, (model, (timing_file, points)) in zip(axes, FULL.items(), strict=True):
        timing = RESULTS / timing_file
        paired = json.loads(timing.read_text())["paired"] if timing.is_file() else {}
        for label, seeds_file, arch in points:
            if not (RESULTS / seeds_file).is_file() or arch not in paired:
                print(f"skipping {model}, {label}: {seeds_file} or {arch} timing missing")
                continue
            deltas = _light_peft_deltas(RESULTS / seeds_file)
            if not deltas:
                continue
            mean = sum(deltas) / len(deltas)
            for ax, what in zip(row, ("train", "infer"), strict=True):
                _point(ax, paired[arch][what], mean, deltas, f"{label} ({len(deltas)} seeds)")
        _axes(row)
        for ax in row:
            ax.set_title(model, fontsize=10)
        row[0].set_ylabel("test accuracy - lora-qv (points)")
        row[0].legend(fontsize=7, loc="lower right")
    _save(fig, "Light-PEFT, full mode (2-thread CPU): removed heads / FFN neurons, score", "_full")


def main() -> None:
    full()
    seeds = json.loads((RESULTS / "lightpeft_quick_seeds.json").read_text())
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for label, timing_file, key in POINTS:
        if not (RESULTS / timing_file).is_file() or key not in seeds:
            print(f"skipping {label}: {timing_file} or {key} missing")
            continue
        ci = json.loads((RESULTS / timing_file).read_text())["speedup_ci"]
        deltas = [float(v) for v in seeds[key]["delta_points_per_seed"].values()]
        mean = seeds[key]["mean_delta_points"]
        for ax, what in zip(axes, ("train", "infer"), strict=True):
            _point(ax, ci[what], mean, deltas, f"heads and FFN neurons {label}")
    _axes(axes)
    axes[0].set_ylabel("test accuracy - lora-qv (points, 5 seeds)")
    axes[0].legend(fontsize=8, loc="lower left")
    _save(fig, "Light-PEFT on minilm / amazon-reviews (--quick, 2-thread CPU)", "")


if __name__ == "__main__":
    main()
