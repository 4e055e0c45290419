"""Time trained Light-PEFT bench runs side by side: training and inference steps per second.

Builds each run's trained architecture from its directory (as ``slimtune bench lightpeft``
does: the saved pruned backbone plus its adapter, or LoRA on a fresh base) and times them
interleaved in one process with the bench's fixed batch (``BATCH`` x ``SEQ`` random tokens or
``BATCH`` random 112 px images): a training step (forward + backward + AdamW), the same step
with every dropout off, and inference with LoRA merged and unmerged. Every ``--pruned`` run is
compared with ``--base`` (per-round ratios, :func:`benchmarks.paired_speedup`). Use it to
time runs kept by ``benchmarks/lightpeft_seeds.py --keep`` or ``slimtune bench lightpeft
--keep``, e.g. another pruning ratio against the bench's lora-qv run of the same seed::

    python -m benchmarks.lightpeft_timing --base DIR/lora-qv-seed0 \\
        --pruned paper=DIR/light-peft-seed0 --pruned ffn0.5=OTHER/light-peft-seed0 \\
        --rounds 20 --out benchmarks/results/FILE.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import machine_info, paired_speedup
from benchmarks.lightpeft import (
    BATCH,
    SEQ,
    _inputs,
    _time,
    build_for_timing,
)
from slimtune.io import atomic_write_text

BASE = "base"


def _named(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {text!r}")
    if name == BASE:
        raise argparse.ArgumentTypeError(f"{BASE!r} is the name of --base")
    if not (Path(path) / "config.yaml").is_file():
        raise argparse.ArgumentTypeError(f"{path} is not a run directory (no config.yaml)")
    return name, Path(path)


def _run_dir(text: str) -> Path:
    if not (Path(text) / "config.yaml").is_file():
        raise argparse.ArgumentTypeError(f"{text} is not a run directory (no config.yaml)")
    return Path(text)


def time_runs(
    runs: dict[str, Path], warmup: int, rounds: int
) -> tuple[dict[str, dict[str, list[float]]], dict[str, Any]]:
    """Step times (seconds) per step kind and run name, and each model's size summary."""
    import slimtune

    models = {name: build_for_timing(path) for name, path in runs.items()}
    kinds = {"text" if hasattr(m.config, "vocab_size") else "image" for m in models.values()}
    if len(kinds) != 1:
        raise SystemExit(f"the runs mix text and image models: {sorted(kinds)}")
    kind = kinds.pop()
    inputs = {name: _inputs(m, kind) for name, m in models.items()}
    sizes = {name: slimtune.summary(m).to_dict() for name, m in models.items()}
    times = _time(models, inputs, warmup, rounds, "timing", no_dropout=list(models))
    return times, sizes


def summarise(times: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    """Samples/s per step kind and run; per pruned run, the ratio of median step times over
    the base run's (``speedup``) and the paired median with its interval (``paired``)."""
    sps = {
        k: {n: round(BATCH / statistics.median(v), 2) for n, v in by.items()}
        for k, by in times.items()
    }
    out: dict[str, Any] = {"samples_per_s": sps, "speedup": {}, "paired": {}}
    for name in times["train"]:
        if name == BASE:
            continue
        out["speedup"][name] = {k: round(sps[k][name] / sps[k][BASE], 3) for k in times}
        out["paired"][name] = {k: paired_speedup(times[k][BASE], times[k][name]) for k in times}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", type=_run_dir, required=True, help="the reference run (lora-qv)")
    ap.add_argument(
        "--pruned",
        type=_named,
        action="append",
        required=True,
        metavar="NAME=DIR",
        help="a run to compare with --base (repeatable)",
    )
    ap.add_argument("--rounds", type=int, default=20, help="timed rounds (default 20)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    ap.add_argument("--out", default=None, help="JSON output path")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0:
        ap.error("--rounds must be >= 1 and --warmup >= 0")
    names = [n for n, _ in args.pruned]
    if len(set(names)) != len(names):
        ap.error(f"--pruned names repeat: {names}")
    if args.threads:
        torch.set_num_threads(args.threads)
    from benchmarks.common import cpu_counters, steal_fraction

    runs = {BASE: args.base, **dict(args.pruned)}
    t0 = time.perf_counter()
    before = cpu_counters()
    times, sizes = time_runs(runs, args.warmup, args.rounds)
    result = {
        "runs": {n: str(p) for n, p in runs.items()},
        **summarise(times),
        "sizes": sizes,
        "step_times_s": {
            k: {n: [round(t, 4) for t in v] for n, v in by.items()} for k, by in times.items()
        },
        "setup": {"batch": BATCH, "seq": SEQ, "rounds": args.rounds, "warmup": args.warmup},
        "cpu_steal_fraction": steal_fraction(before),
        "total_s": round(time.perf_counter() - t0, 1),
        "machine": machine_info(torch.device("cpu")),
    }
    text = json.dumps(result, indent=1)
    if args.out:
        atomic_write_text(Path(args.out), text + "\n")
    print(json.dumps({k: result[k] for k in ("samples_per_s", "speedup", "paired")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
