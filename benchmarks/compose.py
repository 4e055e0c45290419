"""The composition (prune -> allocate -> few bits) against each pass alone and LoRA on q, v.

Per model (``dinov2-s`` on ``fashion-mnist``, ``minilm`` on ``amazon-reviews``), five runs with
the same data, epochs, batch size, learning rate and seed, each a full run of the library's
trainer (:func:`slimtune.app.loop.train`), selected on validation, test accuracy reported once:

- ``lora-qv``: LoRA r 8, alpha 16, dropout 0.05 on q and v (the baseline of every ratio);
- ``spt-lora``: SPT, structured LoRA r 8, budget 0.5% of the backbone (the paper's method:
  sparse deltas and vectors too), float;
- ``light-peft``: the paper's Light-PEFT (LoRA on the six linears, 1/3 of heads and FFN neurons
  pruned, 75% of the LoRA modules and 50% of the ranks);
- ``1bit``: 1-bit AdaptFormer (dim 32, scale 1, no biases) and a 1-bit head (Jie et al.);
- ``compose``: one run config with ``pruning`` (Light-PEFT, 40% of the heads per layer and 45%
  of the FFN neurons), ``allocation`` (SPT on the pruned model, structured LoRA r 4 only, a
  budget of ``COMPOSE_BUDGET`` parameters, warm-started from the early phase's LoRA),
  ``bits: 1`` and ``head_bits: 2``.

``task_bytes``: every file of the run's ``adapter/`` directory (the task file: for the pruned
runs it holds the kept heads and neurons too, nothing of the base). ``backbone_params``: the
base's parameters as trained (pruned or not, the task head excluded). ``train_speedup`` and
``infer_speedup``: over ``lora-qv``, from step times of the five rebuilt models (each rebuilt
from its run directory on the original base, as ``slimtune eval`` does), interleaved in one
process (training: forward + backward + AdamW; inference: eval-mode forward of the model as
deployed, LoRA merged), with the per-round ratio's median and confidence interval
(``speedup_ci``, :func:`benchmarks.common.paired_speedup`). On a CPU the runs go two at a
time, one thread each; the timing uses every core.

``slimtune bench compose [--quick] [--out FILE] [--seeds 0,1,2] [--models dinov2-s,minilm]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from benchmarks.child import run_child
from benchmarks.common import cores, emit, machine_info, paired_speedup
from benchmarks.lightpeft import (
    BATCH,
    SEQ,
    _inputs,
    _interleaved,
    _merged,
    build_for_timing,
    infer_step_fn,
    train_step_fn,
)

__all__ = ["METHODS", "run", "main", "run_configs"]

METHODS = ("lora-qv", "spt-lora", "light-peft", "1bit", "compose")
PAIRS = {"dinov2-s": "fashion-mnist", "minilm": "amazon-reviews"}
COMPOSE_BUDGET = 56_000
"""Trainable LoRA parameters the composition's allocation may place: 7 KB at 1 bit."""
COMPOSE_R = 4
"""The allocation's LoRA rank: r 4 spreads the budget over twice the modules of r 8 (dinov2-s
pilot, one seed: 0.734 against 0.712; r 2: 0.728)."""
COMPOSE_HEAD_BITS = 2
COMPOSE_HEADS = 0.4
COMPOSE_FFN = 0.45
"""Fractions of the heads (per layer) and FFN neurons (globally) the composition prunes: 41%
of the transformer layers (half of both, the first setting, pruned 50% and cost 2.6 more
points on dinov2-s in the pilot)."""
TARGET_BYTES = 16_384
RESULTS = Path("benchmarks") / "results"


def _data(model: str, quick: bool) -> dict[str, Any]:
    if model == "minilm":
        return {
            "max_length": 64,
            "n_train": 800 if quick else 2000,
            "n_val": 200,
            "n_test": 500 if quick else 1000,
        }
    return {
        "image_size": 56,
        "n_train": 800 if quick else 2000,
        "n_val": 200,
        "n_test": 500 if quick else 1000,
    }


def run_configs(model: str, task: str, quick: bool, seed: int = 0) -> dict[str, Any]:
    """The five run configs (:class:`slimtune.app.config.RunConfig`) of one model and seed."""
    from slimtune.app.config import RunConfig

    lora = {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.05}
    common: dict[str, Any] = {
        "model": model,
        "task": task,
        "data": _data(model, quick),
        "train": {"epochs": 3, "batch_size": 16, "lr": 1e-3, "warmup": 0.1, "seed": seed},
    }
    early = 0.35 if quick else 0.2
    return {
        "lora-qv": RunConfig(name="lora-qv", methods=[{**lora, "targets": ["q", "v"]}], **common),
        "spt-lora": RunConfig(
            name="spt-lora",
            allocation={
                "method": "spt",
                "budget": "0.5%",
                "structured": "lora",
                "r": 8,
                "batches": 8,
                "batch_size": 16,
            },
            **common,
        ),  # fmt: skip
        "light-peft": RunConfig(
            name="light-peft",
            pruning={"method": "light-peft", "early_steps": early},
            **common,
        ),
        "1bit": RunConfig(
            name="1bit",
            methods=[
                {
                    "name": "adapter",
                    "placement": "parallel",
                    "activation": "relu",
                    "bias": False,
                    "scale": 1.0,
                    "dim": 32,
                    "bits": 1,
                }
            ],
            head_bits=1,
            **common,
        ),  # fmt: skip
        "compose": RunConfig(
            name="compose",
            pruning={
                "method": "light-peft",
                "early_steps": early,
                "head_ratio": COMPOSE_HEADS,
                "ffn_ratio": COMPOSE_FFN,
            },
            allocation={
                "method": "spt",
                "budget": COMPOSE_BUDGET,
                "structured": "lora",
                "r": COMPOSE_R,
                "unstructured": False,
                "batches": 8,
                "batch_size": 16,
            },
            bits=1,
            head_bits=COMPOSE_HEAD_BITS,
            **common,
        ),  # fmt: skip
    }


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def _train_all(
    model: str, task: str, quick: bool, seed: int, work: Path
) -> dict[str, dict[str, Any]]:
    runs: dict[str, dict[str, Any]] = {}

    def one(method: str) -> None:
        done = work / method / "results.json"
        if done.is_file() and (work / method / "adapter").is_dir():  # --keep: trained already
            runs[method] = {**json.loads(done.read_text()), "wall_s": None}
            return
        t0 = time.perf_counter()
        print(f"[{model} seed {seed}] training {method} ...", file=sys.stderr, flush=True)
        args = ["--train-of", method, "--model", model, "--seed", str(seed)]
        args += ["--run-dir", str(work / method)] + ["--quick"] * quick
        res = run_child("benchmarks.compose", args, f"{model}/{method}")
        res["wall_s"] = round(time.perf_counter() - t0, 1)
        runs[method] = res
        print(
            f"[{model} seed {seed}] {method}: test acc {res['test']['accuracy']:.4f}, "
            f"{_dir_bytes(work / method / 'adapter'):,} B ({res['wall_s']} s)",
            file=sys.stderr,
            flush=True,
        )

    workers = 2 if not torch.cuda.is_available() and cores() >= 2 else 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(one, METHODS))
    return {m: runs[m] for m in METHODS}


def _timing(
    model: str, task: str, work: Path, warmup: int, steps: int
) -> dict[str, dict[str, list[float]]]:
    from slimtune.app.data.registry import task_kind

    kind = task_kind(task)
    torch.set_num_threads(cores())
    models = {m: build_for_timing(work / m) for m in METHODS}
    inputs = {m: _inputs(models[m], kind, batch=BATCH, seq=SEQ) for m in METHODS}
    train = _interleaved(
        {m: train_step_fn(models[m], inputs[m]) for m in METHODS}, warmup, steps, f"{model} train"
    )
    deployed = {m: _merged(models[m]) for m in METHODS}
    infer = _interleaved(
        {m: infer_step_fn(deployed[m], inputs[m]) for m in METHODS},
        warmup,
        steps,
        f"{model} inference",
    )
    return {"train": train, "infer": infer}


def _model_result(
    model: str, task: str, seeds: list[int], quick: bool, work: Path, timing: tuple[int, int]
) -> dict[str, Any]:
    import slimtune

    per_seed: dict[int, dict[str, dict[str, Any]]] = {}
    for seed in seeds:
        per_seed[seed] = _train_all(model, task, quick, seed, work / f"seed{seed}")
    first = work / f"seed{seeds[0]}"
    times = _timing(model, task, first, *timing)
    med = {what: {m: statistics.median(v) for m, v in by.items()} for what, by in times.items()}
    sizes = {m: slimtune.summary(build_for_timing(first / m)) for m in METHODS}

    def mean(values: list[float]) -> float:
        return round(statistics.fmean(values), 4)

    runs0 = per_seed[seeds[0]]
    out: dict[str, Any] = {
        "task": task,
        "acc": {m: mean([per_seed[s][m]["test"]["accuracy"] for s in seeds]) for m in METHODS},
        "val_acc": {m: mean([per_seed[s][m]["val"]["accuracy"] for s in seeds]) for m in METHODS},
        "task_bytes": {m: _dir_bytes(first / m / "adapter") for m in METHODS},
        "task_parts": {m: runs0[m]["task"]["parts"] for m in METHODS},
        "backbone_params": {m: sizes[m].base for m in METHODS},
        "trainable_params": {m: sizes[m].trainable for m in METHODS},
        "train_speedup": {m: round(med["train"]["lora-qv"] / med["train"][m], 3) for m in METHODS},
        "infer_speedup": {m: round(med["infer"]["lora-qv"] / med["infer"][m], 3) for m in METHODS},
        "speedup_ci": {
            what: {m: paired_speedup(by["lora-qv"], by[m]) for m in METHODS if m != "lora-qv"}
            for what, by in times.items()
        },
        "pruned_fraction": {
            m: round(runs0[m]["pruning"]["pruned_fraction"], 4)
            for m in METHODS
            if "pruning" in runs0[m]
        },
        "train_s": {m: round(runs0[m]["train_s"], 1) for m in METHODS},
        "run_wall_s": {m: runs0[m]["wall_s"] for m in METHODS},
        "compose": {
            "allocation": runs0["compose"]["allocation"],
            "blocks": runs0["compose"]["pruning"]["blocks"],
            "tensors": runs0["compose"]["task"]["tensors"],
        },
        "step_times_s": {
            what: {m: [round(t, 4) for t in v] for m, v in by.items()} for what, by in times.items()
        },
    }
    if len(seeds) > 1:
        out["acc_by_seed"] = {
            m: {str(s): per_seed[s][m]["test"]["accuracy"] for s in seeds} for m in METHODS
        }
    lq = out["acc"]["lora-qv"]
    out["targets"] = {
        "task_bytes<=16384": out["task_bytes"]["compose"] <= TARGET_BYTES,
        "pruned>=0.40": out["pruned_fraction"]["compose"] >= 0.40,
        "infer_speedup>=1.5": out["infer_speedup"]["compose"] >= 1.5,
        "train_speedup>=1.4": out["train_speedup"]["compose"] >= 1.4,
        "acc_within_1pt": out["acc"]["compose"] >= lq - 0.01,
        "acc_delta_vs_lora_qv": round(out["acc"]["compose"] - lq, 4),
    }
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    """Task bytes (log) against test accuracy, one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    models = [m for m in PAIRS if m in result]
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        r = result[model]
        for m in METHODS:
            ax.scatter(r["task_bytes"][m], r["acc"][m], s=40)
            ax.annotate(m, (r["task_bytes"][m], r["acc"][m]), textcoords="offset points",
                        xytext=(5, 4), fontsize=9)  # fmt: skip
        ax.axvline(TARGET_BYTES, color="grey", ls=":", lw=1)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("task file bytes (log)")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{model} / {r['task']}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(
    quick: bool = False,
    out: str | None = None,
    seeds: list[int] | None = None,
    models: list[str] | None = None,
    keep: str | None = None,
    timing_steps: int | None = None,
) -> dict[str, Any]:
    """Run the benchmark, print and save the JSON (and the size-vs-accuracy plot beside it).

    ``quick``: 800 training examples, 500 test examples, 3 epochs, one seed, 5 timed steps;
    the full mode: 2000 / 1000, three seeds (0, 1, 2), 10 timed steps. The JSON is written
    after each model, so a stop in the second keeps the first.
    """
    seeds = seeds or ([0] if quick else [0, 1, 2])
    models = models or list(PAIRS)
    path = Path(out) if out else RESULTS / f"compose{'_quick' * quick}.json"
    timing = (2, timing_steps or (5 if quick else 10))
    result: dict[str, Any] = {
        "setup": {
            "quick": quick,
            "seeds": seeds,
            "compose_budget": COMPOSE_BUDGET,
            "compose_head_bits": COMPOSE_HEAD_BITS,
            "compose_r": COMPOSE_R,
            "compose_head_ratio": COMPOSE_HEADS,
            "compose_ffn_ratio": COMPOSE_FFN,
            "timing_batch": BATCH,
            "timing_seq_text": SEQ,
            "timing_image_px": 112,
            "timing_warmup_steps": timing[0],
            "timing_steps": timing[1],
            "configs": {
                model: {m: c.to_dict() for m, c in run_configs(model, PAIRS[model], quick).items()}
                for model in models
            },
        },
        "machine": machine_info(torch.device("cpu")),
    }
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="slimtune-compose-") as tmp:
        work = Path(keep) if keep else Path(tmp)
        for model in models:
            result[model] = _model_result(model, PAIRS[model], seeds, quick, work / model, timing)
            result["wall_s"] = round(time.perf_counter() - t0, 1)
            emit(result, path)
            plot(result, path.with_suffix(".png"))
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="slimtune bench compose", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one seed, 800 examples (CPU: ~1 hour)")
    ap.add_argument("--out", default=None, help="JSON output (the plot goes beside it, .png)")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (default 0 / 0,1,2)")
    ap.add_argument("--models", default=None, help=f"comma-separated, of {', '.join(PAIRS)}")
    ap.add_argument(
        "--keep",
        default=None,
        help="keep the run directories under this folder (runs found there are not trained again)",
    )
    ap.add_argument(
        "--timing-steps", type=int, default=None, help="timed steps per method (5 / 10)"
    )
    ap.add_argument("--train-of", choices=METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--model", default="minilm", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.train_of:
        from slimtune.app.loop import train

        torch.set_num_threads(1)
        cfg = run_configs(args.model, PAIRS[args.model], args.quick, args.seed)[args.train_of]
        res = train(cfg, Path(args.run_dir), progress=False)
        print(json.dumps(res))
        return 0
    models = args.models.split(",") if args.models else None
    for m in models or []:
        if m not in PAIRS:
            ap.error(f"--models: unknown model {m!r}; known: {', '.join(PAIRS)}")
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    run(
        quick=args.quick,
        out=args.out,
        seeds=seeds,
        models=models,
        keep=args.keep,
        timing_steps=args.timing_steps,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
