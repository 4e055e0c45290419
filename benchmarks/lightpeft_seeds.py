"""Accuracy of the Light-PEFT bench's methods over several seeds.

Trains the run configs of ``slimtune bench lightpeft`` (the same data, epochs and settings;
``--quick`` for the quick mode's) with ``train.seed`` changed, and saves every run's
validation and test accuracy as it finishes (a stopped job resumes where it stopped: runs
already in ``--out`` are skipped). The summary gives each method's mean and, per seed, the
difference from ``lora-qv``.

    python -m benchmarks.lightpeft_seeds --model dinov2-s --task fashion-mnist \\
        --seeds 1 2 3 4 --methods lora-qv light-peft --out benchmarks/results/FILE.json

``--baseline FILE ...`` takes the ``lora-qv`` and ``lora-all`` runs of the given seeds from
other files of the same model, task and mode instead of training them again (they do not depend
on the pruning settings); each copied run names its file in ``source``. ``--keep DIR`` keeps
every run's directory (``DIR/<method>-seed<N>``), for instance to time the trained models with
``benchmarks/lightpeft_timing.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.lightpeft import (
    METHODS,
    add_pruning_options,
    pruning_overrides,
    pruning_settings,
    run_configs,
)
from slimtune.io import atomic_write_text

UNPRUNED = ("lora-qv", "lora-all")
"""The bench's methods whose runs do not depend on the Light-PEFT settings."""


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean test accuracy per method and the per-seed difference from ``lora-qv``."""
    by: dict[str, dict[int, float]] = {}
    for r in runs:
        by.setdefault(r["method"], {})[r["seed"]] = r["test"]
    out: dict[str, Any] = {
        "mean_test": {m: round(statistics.fmean(v.values()), 4) for m, v in by.items()}
    }
    base = by.get("lora-qv", {})
    for m, v in by.items():
        if m == "lora-qv":
            continue
        seeds = sorted(set(v) & set(base))
        if seeds:
            diff = [round(v[s] - base[s], 4) for s in seeds]
            out[f"{m}_minus_lora_qv"] = {
                "seeds": seeds,
                "per_seed": diff,
                "mean": round(statistics.fmean(diff), 4),
            }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--task", default="amazon-reviews")
    ap.add_argument("--quick", action="store_true", help="the quick mode's data and settings")
    ap.add_argument("--seeds", type=int, nargs="+", required=True)
    ap.add_argument("--methods", nargs="+", default=["lora-qv", "light-peft"], choices=METHODS)
    add_pruning_options(ap)
    ap.add_argument(
        "--baseline",
        nargs="+",
        default=[],
        metavar="FILE",
        help="take lora-qv and lora-all runs from these seeds files instead of training them",
    )
    ap.add_argument(
        "--keep",
        default=None,
        metavar="DIR",
        help="keep each run's directory as DIR/<method>-seed<N> (for timing it later)",
    )
    ap.add_argument("--out", required=True, help="JSON file (created, or resumed)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from slimtune.app.loop import train

    pruning = pruning_settings(args.quick, pruning_overrides(args))
    out = Path(args.out)
    doc: dict[str, Any] = json.loads(out.read_text()) if out.is_file() else {}
    setup = {"model": args.model, "task": args.task, "quick": args.quick, "pruning": pruning}
    if doc and doc.get("setup") != setup:
        ap.error(f"{out} holds runs of another setup: {doc.get('setup')}")
    doc["setup"] = setup
    runs: list[dict[str, Any]] = doc.setdefault("runs", [])
    done = {(r["method"], r["seed"]) for r in runs}
    for path in args.baseline:
        other = json.loads(Path(path).read_text())
        where = {k: other.get("setup", {}).get(k) for k in ("model", "task", "quick")}
        if where != {k: setup[k] for k in where}:
            ap.error(f"{path} holds runs of {where}, not of {args.model}/{args.task}")
        for r in other.get("runs", []):
            key = (r["method"], r["seed"])
            if r["method"] in UNPRUNED and r["seed"] in args.seeds and key not in done:
                runs.append({**r, "source": r.get("source", Path(path).name)})
                done.add(key)
    if runs:
        doc["summary"] = summarise(runs)
        atomic_write_text(out, json.dumps(doc, indent=1) + "\n")
    configs = run_configs(args.model, args.task, args.quick, pruning)
    for seed in args.seeds:
        for method in args.methods:
            if (method, seed) in done:
                continue
            cfg = configs[method]
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed))
            if args.keep:
                res = train(cfg, Path(args.keep) / f"{method}-seed{seed}", progress=False)
            else:
                with tempfile.TemporaryDirectory(prefix="slimtune-seeds-") as work:
                    res = train(cfg, Path(work), progress=False)
            run = {
                "method": method,
                "seed": seed,
                "test": res["test"]["accuracy"],
                "val": res["val"]["accuracy"],
                "train_s": round(res["train_s"], 1),
            }
            runs.append(run)
            doc["summary"] = summarise(runs)
            atomic_write_text(out, json.dumps(doc, indent=1) + "\n")
            print(json.dumps(run), flush=True)
    print(json.dumps(doc.get("summary", {}), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
