"""PEFT methods on a real decoder: smollm2-135m fine-tuned as a causal LM on two tasks.

Tasks (``objective: causal-lm`` runs of :func:`slimtune.app.loop.train`, loss on the response
tokens only): ``movie-sentiment`` (Rotten Tomatoes snippets, scored by the likelihood of
`` negative`` / `` positive`` after ``Review: ...\\nSentiment:``: accuracy) and ``chat-qa``
(chatterbot-corpus question -> answer pairs, greedy generation: exact match).

Methods, same data, epochs, batch and seed:

* ``zero-shot``: the instruct model as it comes (no training);
* ``lora-qv``: LoRA r 8, alpha 16 on q and v;
* ``lora-all``: the same on all seven linears (q, k, v, o, gate, up, down);
* ``spt-lora``: SPT allocation (structured LoRA r 8, sensitivity on the task's loss) at
  ``lora-qv``'s trainable-parameter count;
* ``lora-1bit``: ``lora-all`` with A and B trained and stored at 1 bit (quantization-aware);
* ``full``: every parameter trained (learning rate 3e-5 instead of LoRA's 1e-3).

Each run is a fresh process (two side by side, one thread each, on a CPU), so
``peak_train_mem_mb`` is that process's peak resident memory (model load, training and
evaluation; CUDA: ``max_memory_allocated``), ``train_s`` the run's training time,
``adapter_bytes`` the bytes of its saved ``adapter/`` directory (for ``full``: every tensor).
The top-level ``trainable_params``, ``peak_train_mem_mb``, ``train_s`` and ``adapter_bytes``
are those of the ``movie-sentiment`` runs; ``by_task`` has both tasks'.

Run ``slimtune bench decoder [--quick] [--out FILE]`` or ``python -m benchmarks.decoder``.
``--quick`` trains on 96 examples for one epoch and tests on 200 snippets / 50 questions
(a smoke run: about 15 minutes on 2 CPU cores); the full mode trains on 800 snippets (2 epochs)
and 400 questions (3 epochs) and tests on 1000 / 200.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from benchmarks.child import run_child

__all__ = ["run", "main", "METHODS", "TASKS", "run_config"]

MODEL = "smollm2-135m"
METHODS = ("zero-shot", "lora-qv", "lora-all", "spt-lora", "lora-1bit", "full")
TASKS = ("movie-sentiment", "chat-qa")
ALL = ["q", "k", "v", "o", "fc1", "fc2"]  # Llama's fc1 role: gate and up -> seven linears
RESULTS = Path("benchmarks") / "results"


def _data(task: str, quick: bool) -> dict[str, Any]:
    if task == "movie-sentiment":
        return (
            {"n_train": 96, "n_val": 32, "n_test": 200, "max_length": 64}
            if quick
            else {"n_train": 800, "n_val": 200, "n_test": 1000, "max_length": 96}
        )
    return (
        {"n_train": 96, "n_val": 32, "n_test": 50, "max_length": 48}
        if quick
        else {"n_train": 400, "n_val": 100, "n_test": 200, "max_length": 64}
    )


def run_config(
    method: str, task: str, quick: bool, budget: int | None = None, epochs: int | None = None
) -> Any:
    """The :class:`~slimtune.app.config.RunConfig` of one method on one task (``epochs``: the
    mode's unless given)."""
    from slimtune.app.config import RunConfig

    if epochs is None:
        epochs = 1 if quick else (2 if task == "movie-sentiment" else 3)
    train = {"epochs": epochs, "batch_size": 8, "eval_batch_size": 16, "lr": 1e-3, "seed": 0}
    lora = {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.05}
    extra: dict[str, Any] = {"methods": []}
    if method == "lora-qv":
        extra["methods"] = [{**lora, "targets": ["q", "v"]}]
    elif method == "lora-all":
        extra["methods"] = [{**lora, "targets": ALL}]
    elif method == "lora-1bit":
        extra["methods"] = [{**lora, "targets": ALL, "bits": 1}]
    elif method == "spt-lora":
        if budget is None:
            raise ValueError("spt-lora needs lora-qv's trainable count as its budget")
        extra["allocation"] = {
            "method": "spt",
            "budget": budget,
            "structured": "lora",
            "r": 8,
            "lora_alpha": 16,
            "batches": 4 if quick else 16,
            "batch_size": 8,
        }
    elif method == "full":
        extra["methods"] = [{"name": "full", "targets": ["param:.*"]}]
        train["lr"] = 3e-5
    elif method != "zero-shot":
        raise ValueError(f"unknown method {method!r}; methods: {', '.join(METHODS)}")
    return RunConfig(
        name=method,
        objective="causal-lm",
        model=MODEL,
        task=task,
        data=_data(task, quick),
        train=train,
        fast_dropout=False,
        **extra,
    )


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _child(
    method: str, task: str, quick: bool, budget: int | None, run_dir: Path, epochs: int | None
) -> dict:
    """Body of a run's subprocess: train (or only evaluate, zero-shot) and report."""
    from benchmarks.memory import peak_mb, reset_peak

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reset_peak(device)
    cfg = run_config(method, task, quick, budget, epochs)
    if method == "zero-shot":
        from contextlib import nullcontext

        from slimtune.app.build import causal_lm
        from slimtune.app.loop import run_hooks

        t0 = time.perf_counter()
        model, info, data = causal_lm(cfg)
        model.to(device).eval()
        hooks = run_hooks(cfg, info, data, device, nullcontext)
        test = hooks.evaluate(model, data.test)
        return {
            "acc": test[hooks.select],
            "metric": hooks.select,
            "trainable_params": 0,
            "train_s": 0.0,
            "adapter_bytes": 0,
            "peak_train_mem_mb": round(peak_mb(device), 1),
            "eval_s": round(time.perf_counter() - t0, 1),
        }
    from slimtune.app.loop import train

    res = train(cfg, run_dir, progress=False)
    return {
        "acc": res["test"]["accuracy"],
        "val_acc": res["val"]["accuracy"],
        "metric": res["metric"],
        "trainable_params": res["trainable_params"],
        "train_s": round(res["train_s"], 1),
        "adapter_bytes": _dir_bytes(run_dir / "adapter"),
        "peak_train_mem_mb": round(peak_mb(device), 1),
    }


def _run_one(
    method: str, task: str, quick: bool, budget: int | None, work: Path, epochs: int | None
) -> dict:
    args = ["--run-of", method, "--task", task, "--run-dir", str(work / task / method)]
    args += ["--quick"] * quick + (["--budget", str(budget)] if budget is not None else [])
    args += ["--epochs", str(epochs)] if epochs is not None else []
    t0 = time.perf_counter()
    print(f"[{task}] {method} ...", file=sys.stderr, flush=True)
    res = run_child("benchmarks.decoder", args, f"{method} on {task}")
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    print(
        f"[{task}] {method}: {res['metric']} {res['acc']:.4f} ({res['wall_s']} s)", file=sys.stderr
    )
    return res


def run(quick: bool = False, out: str | None = None, epochs: int | None = None) -> dict[str, Any]:
    """Run every method on both tasks, print and save the JSON, and return it (``epochs``:
    training epochs of every run instead of the mode's).

    Returns:
        ``acc.<task>.<method>`` (test accuracy or exact match, a fraction), ``metric.<task>``,
        ``trainable_params.<method>``, ``peak_train_mem_mb.<method>``, ``train_s.<method>``,
        ``adapter_bytes.<method>`` (movie-sentiment runs), ``by_task``, ``spt_budget``,
        ``setup``, ``machine``.
    """
    from benchmarks.common import cores, emit, machine_info

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    parallel = 2 if not torch.cuda.is_available() and cores() >= 2 else 1
    by_task: dict[str, dict[str, dict[str, Any]]] = {}
    budgets: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="slimtune-decoder-") as tmp:
        work = Path(tmp)
        for task in TASKS:
            got: dict[str, dict[str, Any]] = {}
            with ThreadPoolExecutor(max_workers=parallel) as pool:
                first = {
                    m: pool.submit(_run_one, m, task, quick, None, work, epochs)
                    for m in METHODS[:2]
                }
                got.update({m: f.result() for m, f in first.items()})
                budgets[task] = int(got["lora-qv"]["trainable_params"])
                rest = {
                    m: pool.submit(
                        _run_one,
                        m,
                        task,
                        quick,
                        budgets[task] if m == "spt-lora" else None,
                        work,
                        epochs,
                    )
                    for m in METHODS[2:]
                }
                got.update({m: f.result() for m, f in rest.items()})
            by_task[task] = {m: got[m] for m in METHODS}
    main_task = by_task[TASKS[0]]
    result: dict[str, Any] = {
        "model": MODEL,
        "acc": {t: {m: by_task[t][m]["acc"] for m in METHODS} for t in TASKS},
        "metric": {t: by_task[t]["zero-shot"]["metric"] for t in TASKS},
        "trainable_params": {m: main_task[m]["trainable_params"] for m in METHODS},
        "peak_train_mem_mb": {m: main_task[m]["peak_train_mem_mb"] for m in METHODS},
        "train_s": {m: main_task[m]["train_s"] for m in METHODS},
        "adapter_bytes": {m: main_task[m]["adapter_bytes"] for m in METHODS},
        "spt_budget": budgets,
        "spt_minus_lora_qv": {
            t: round(by_task[t]["spt-lora"]["acc"] - by_task[t]["lora-qv"]["acc"], 4) for t in TASKS
        },
        "above_zero_shot": {
            t: {
                m: by_task[t][m]["acc"] > by_task[t]["zero-shot"]["acc"]
                for m in METHODS
                if m != "zero-shot"
            }
            for t in TASKS
        },
        "by_task": by_task,
        "setup": {
            t: {
                "data": run_config("lora-qv", t, quick, epochs=epochs).to_dict()["data"],
                "train": run_config("lora-qv", t, quick, epochs=epochs).to_dict()["train"],
                "full_lr": 3e-5,
                "lora": {"r": 8, "alpha": 16, "dropout": 0.05},
            }
            for t in TASKS
        },
        "mem_method": "peak RSS of the run's process (VmHWM: model load, training, evaluation)"
        if not torch.cuda.is_available()
        else "cuda max_memory_allocated",
        "quick": quick,
        "parallel_runs": parallel,
        "total_s": round(time.perf_counter() - t0, 1),
        "machine": machine_info(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
    }
    path = Path(out) if out else RESULTS / ("decoder_quick.json" if quick else "decoder.json")
    emit(result, path)
    return result


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``python -m benchmarks.decoder``)."""
    ap = argparse.ArgumentParser(prog="slimtune bench decoder", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the small version (about 15 minutes)")
    ap.add_argument("--out", default=None, help="JSON output path")
    ap.add_argument(
        "--epochs", type=int, default=None, help="epochs of every run (default: the mode's)"
    )
    ap.add_argument("--run-of", choices=METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--task", choices=TASKS, default=TASKS[0], help=argparse.SUPPRESS)
    ap.add_argument("--budget", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.run_of:
        from benchmarks.common import cores

        torch.set_num_threads(1 if cores() >= 2 and not torch.cuda.is_available() else cores())
        res = _child(
            args.run_of, args.task, args.quick, args.budget, Path(args.run_dir), args.epochs
        )
        print(json.dumps(res))
        return 0
    if args.epochs is not None and args.epochs < 1:
        ap.error(f"--epochs must be at least 1, got {args.epochs}")
    run(quick=args.quick, out=args.out, epochs=args.epochs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
