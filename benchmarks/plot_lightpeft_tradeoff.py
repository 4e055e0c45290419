"""Light-PEFT's speed/accuracy trade-off from the saved results: one point per pruning ratio.

x: speedup over LoRA q, v (median of the per-round ratios, with its 95% interval, from the
30-round timing runs); y: test accuracy minus lora-qv's, mean over five seeds (bars: the
lowest and highest seed). Run from the repository root:
``python benchmarks/plot_lightpeft_tradeoff.py`` -> ``benchmarks/results/lightpeft_tradeoff.png``.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
POINTS = (  # label, timing run, summary key in lightpeft_quick_seeds.json
    ("1/3 (paper)", "lightpeft_quick_30rounds.json", "summary_lora_qv_vs_light_peft_early_0.35"),
    ("0.45", "lightpeft_quick_ratio0.45_30rounds.json", "summary_lora_qv_vs_light_peft_0.45"),
    ("1/2", "lightpeft_quick_half_30rounds.json", "summary_lora_qv_vs_light_peft_half_early_0.35"),
)


def main() -> None:
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
            c = ci[what]
            ax.errorbar(
                c["median"],
                mean,
                xerr=[[c["median"] - c["low"]], [c["high"] - c["median"]]],
                yerr=[[mean - min(deltas)], [max(deltas) - mean]],
                fmt="o",
                capsize=3,
                label=f"heads and FFN neurons {label}",
            )
    for ax, what in zip(axes, ("training", "inference (LoRA merged)"), strict=True):
        ax.axvline(1.5, color="grey", ls="--", lw=1)
        ax.axhline(-1.0, color="grey", ls=":", lw=1)
        ax.set_xlabel(f"{what} speedup over LoRA q, v")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy - lora-qv (points, 5 seeds)")
    axes[0].legend(fontsize=8, loc="lower left")
    fig.suptitle("Light-PEFT on minilm / amazon-reviews (--quick, 2-thread CPU)")
    fig.tight_layout()
    out = RESULTS / "lightpeft_tradeoff.png"
    fig.savefig(out, dpi=110)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
