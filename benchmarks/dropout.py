"""Training-step speed of the backbone's dropout: torch's ``bernoulli_`` against ``fast_dropout``.

Setup: all-MiniLM-L6-v2 as a 2-class classifier (the checkpoint's dropout, 0.1 on hidden states
and attention probabilities), LoRA r=8, alpha=16 on q and v (dropout 0.05), batch 32 x 128
random tokens with a full attention mask. Three copies of the same model are timed, steps
interleaved (torch, fast, off, torch, ...), warm-up excluded, median reported:

* ``torch``: the model as loaded (``nn.Dropout``, and attention dropout inside
  ``scaled_dot_product_attention``, which then takes its unfused math path on CPU);
* ``fast``: the same after :func:`slimtune.dropout.use_fast_dropout` (what a run config's
  ``fast_dropout: true``, the default, does);
* ``off``: the same step in eval mode, every dropout off: the floor no dropout can beat.

A step is forward + backward + AdamW. ``eval_max_abs_diff`` checks that evaluation outputs of
``torch`` and ``fast`` are the same (dropout is off there). Each entry of ``by_threads`` is one
thread count (``--threads 2,1``).

Run ``slimtune bench dropout [--quick] [--threads 2,1] [--out FILE]`` or
``python -m benchmarks.dropout --quick``.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["run", "main"]

RESULTS = Path("benchmarks") / "results"


def run(quick: bool = False, out: str | None = None, threads: Sequence[int] = ()) -> dict[str, Any]:
    """Time the three variants, print and save the JSON, and return it.

    Args:
        quick: 1 warm-up and 5 timed steps (else 2 and 15).
        out: JSON path (default ``benchmarks/results/fast_dropout[_quick].json``).
        threads: thread counts to time with (default: every core).

    Returns:
        ``{"by_threads": {n: {"step_s": {...}, "fast_vs_torch": ..., "fast_vs_torch_ci": ...,
        "dropout_cost": {...}}}, "eval_max_abs_diff", "setup", "machine"}``;
        ``fast_vs_torch_ci`` is :func:`benchmarks.paired_speedup` of the interleaved
        steps (median per-round ratio and its 95% interval); ``dropout_cost`` is the step time above
        ``off`` as a fraction of ``off``'s; ``cpu_steal_fraction`` the share of CPU time the
        hypervisor gave to other machines meanwhile (noise on a shared virtual machine).
    """
    import slimtune
    from benchmarks.common import cores, emit, machine_info, paired_speedup
    from benchmarks.lightpeft import BATCH, SEQ, _inputs, _interleaved, train_step_fn
    from slimtune.dropout import use_fast_dropout
    from slimtune.models.loader import load_model

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    torch.manual_seed(0)
    base, _ = load_model("minilm", 2)
    model = slimtune.apply(base, slimtune.LoRA(r=8, alpha=16, dropout=0.05, targets=["q", "v"]))
    fast = copy.deepcopy(model)
    counts = use_fast_dropout(fast)
    inputs = _inputs(model, "text")
    with torch.no_grad():
        a = model.eval()(**inputs).logits
        b = fast.eval()(**inputs).logits
    diff = float((a - b).abs().max())
    warmup, steps = (1, 5) if quick else (2, 15)
    result: dict[str, Any] = {"by_threads": {}}
    for n in list(threads) or [cores()]:
        torch.set_num_threads(n)
        fns = {
            "torch": train_step_fn(model, inputs),
            "fast": train_step_fn(fast, inputs),
            "off": train_step_fn(model, inputs, dropout=False),
        }
        steal: dict[str, float | None] = {}
        what = f"{n} thread{'s' * (n > 1)}"
        times = _interleaved(fns, warmup, steps, what, steal)
        med = {k: statistics.median(v) for k, v in times.items()}
        result["by_threads"][str(n)] = {
            "step_s": {k: round(v, 4) for k, v in med.items()},
            "fast_vs_torch": round(med["torch"] / med["fast"], 3),
            "fast_vs_torch_ci": paired_speedup(times["torch"], times["fast"]),
            "dropout_cost": {k: round(med[k] / med["off"] - 1, 3) for k in ("torch", "fast")},
            "step_times_s": {k: [round(t, 4) for t in v] for k, v in times.items()},
            "cpu_steal_fraction": steal[what],
        }
    result["eval_max_abs_diff"] = diff
    result["replaced"] = counts
    result["setup"] = {
        "model": "minilm",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "targets": ["q", "v"]},
        "batch": BATCH,
        "seq": SEQ,
        "warmup": warmup,
        "steps": steps,
    }
    result["total_s"] = round(time.perf_counter() - t0, 1)
    result["machine"] = machine_info(torch.device("cpu"))
    path = (
        Path(out)
        if out
        else RESULTS / ("fast_dropout_quick.json" if quick else "fast_dropout.json")
    )
    emit(result, path)
    return result


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``python -m benchmarks.dropout``)."""
    from benchmarks.lightpeft import parse_threads

    ap = argparse.ArgumentParser(prog="slimtune bench dropout", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="5 timed steps instead of 15")
    ap.add_argument("--out", default=None, help="JSON output path")
    ap.add_argument("--threads", default="", help="thread counts, e.g. 2,1 (default: all cores)")
    args = ap.parse_args(argv)
    try:
        threads = parse_threads(args.threads)
    except ValueError as exc:
        ap.error(f"--threads: {exc}")
    run(quick=args.quick, out=args.out, threads=threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
