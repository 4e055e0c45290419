"""Light-PEFT against LoRA on q,v (the paper's baseline) and LoRA on all six linears.

Accuracy: each method is a full run (:func:`slimtune.app.loop.train`) with the same data,
epochs, batch size, learning rate and seed; the model is selected on validation and the test
accuracy is reported once. ``lora-qv``: LoRA r 8, alpha 16, dropout 0.05 on q and v;
``lora-all``: the same on q, k, v, o, fc1, fc2; ``light-peft``: the run config's
``pruning: {method: light-peft, ...}`` (early phase with LoRA on all six linears and masks,
prune heads 1/3 per layer, FFN neurons 1/3 globally, LoRA modules 75% and ranks 50% globally,
then train the pruned model from the surviving LoRA weights). On a CPU the runs go two at a
time, each in its own process with one thread (faster in all than one after the other with
every core: small GEMMs do not scale), so ``train_s``/``run_wall_s`` are times under that
sharing; speed is measured separately, below.

Speed: the three trained architectures (the light-peft one rebuilt from its run directory: the
saved pruned backbone plus its adapter, which also checks that the pruned model reloads as a
standalone model) are timed side by side in one process on a fixed batch (``BATCH`` x ``SEQ``
random tokens, full attention mask), steps interleaved (lora-qv, lora-all, light-peft,
lora-qv, ...) so that clock drift and other processes hit all of them alike; warm-up steps are
excluded and the median is reported (``speedup_ci``: the median of the per-round ratios with a
distribution-free confidence interval, :func:`benchmarks.paired_speedup`, which says how
much the machine's noise leaves open). A training step is forward + backward + AdamW step;
an inference step is a forward in eval mode without gradients. Inference is timed on the model as
deployed, LoRA merged into the weights (``slimtune.merge``: no extra latency), and again
unmerged (``infer_unmerged_samples_per_s``, ``infer_speedup_unmerged``). The training step of
lora-qv and light-peft is also timed with every dropout off (eval mode), which gives
``train_speedup_without_dropout``: on CPU the backbone's dropout draws its masks on one thread
and, outside attention, does not shrink with pruning.

Memory: a fresh subprocess per method builds the model, resets the RSS high-water mark
(``/proc/self/clear_refs``, after ``malloc_trim``), runs two inference steps and reads
``VmHWM``, resets again and runs two training steps (CUDA: ``max_memory_allocated``); inference
memory is that of the merged model. The subprocess fixes glibc's mmap threshold at 128 KiB
(:func:`benchmarks.memory.track_live_memory`) so that the RSS follows live tensors rather
than heap fragmentation. The numbers include the interpreter, libraries and the model's weights,
so differences between methods are what matters.

``pruned_fraction`` counts the transformer layers' attention and FFN parameters (q, k, v, o,
fc1, fc2 with biases), embeddings excluded, as the paper does.

Run ``slimtune bench lightpeft [--quick] [--out FILE]`` or
``python -m benchmarks.lightpeft --quick``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks.child import run_child
from benchmarks.memory import peak_mb, reset_peak, track_live_memory
from slimtune.passes.lightpeft import BACKBONE_SCORES

__all__ = [
    "run",
    "main",
    "run_configs",
    "pruning_settings",
    "add_pruning_options",
    "pruning_overrides",
    "METHODS",
    "BATCH",
    "SEQ",
]

METHODS = ("lora-qv", "lora-all", "light-peft")
UNMERGED = "/unmerged"
NODROP = "/no-dropout"
MORE = "light-peft-half"
"""Extra variant: Light-PEFT removing 1/2 of the heads and FFN neurons (instead of 1/3)."""
BATCH = 32
SEQ = 128
TIMING_SHAPE = {"smollm2-135m": (8, 128)}
"""Timing batch x sequence of models other than the default ``BATCH`` x ``SEQ`` (a 135M decoder
step of 32 x 128 tokens takes tens of seconds on 2 CPU cores)."""
RATIOS = ("head_ratio", "ffn_ratio", "module_ratio", "rank_ratio")
SIX = ["q", "k", "v", "o", "fc1", "fc2"]
RESULTS = Path("benchmarks") / "results"


def _lora(targets: list[str]) -> list[dict[str, Any]]:
    return [{"name": "lora", "r": 8, "alpha": 16, "dropout": 0.05, "targets": targets}]


def _decoder_data(quick: bool) -> dict[str, Any]:
    return (
        {"max_length": 64, "n_train": 400, "n_val": 100, "n_test": 400}
        if quick
        else {"max_length": 96, "n_train": 2000, "n_val": 300, "n_test": 1000}
    )


DECODER_RUNS = {"smollm2-135m": _decoder_data}
"""Data of the runs of decoder models (``quick`` -> the data section)."""


def run_configs(
    model: str,
    task: str,
    quick: bool,
    pruning: dict[str, Any],
    model_dropout: float | None = None,
    fast_dropout: bool = True,
) -> dict[str, Any]:
    """Run configs of the three methods (plain dicts for :class:`RunConfig`)."""
    from slimtune.app.config import RunConfig
    from slimtune.app.data.registry import task_kind

    text = task_kind(task) == "text"
    data: dict[str, Any] = (
        {"max_length": 64, "n_train": 800, "n_val": 200, "n_test": 500}
        if quick
        else {"max_length": 128, "n_train": 3500, "n_val": 500, "n_test": 1000}
    )
    if not text:
        data = {"image_size": 56, "n_train": 800 if quick else 2000, "n_val": 200, "n_test": 1000}
    train = {"epochs": 3, "batch_size": 16, "lr": 1e-3, "warmup": 0.1, "seed": 0}
    if model in DECODER_RUNS:  # a 135M decoder: fewer, shorter examples on a CPU
        data, train = DECODER_RUNS[model](quick), {**train, "epochs": 2, "lr": 5e-4}
    common: dict[str, Any] = {"model": model, "task": task, "data": data, "train": train}
    common["model_dropout"] = model_dropout
    common["fast_dropout"] = fast_dropout
    configs = {
        "lora-qv": RunConfig(name="lora-qv", methods=_lora(["q", "v"]), **common),
        "lora-all": RunConfig(name="lora-all", methods=_lora(SIX), **common),
        "light-peft": RunConfig(name="light-peft", methods=_lora(SIX), pruning=pruning, **common),
    }
    if not quick:  # the extra variant would take --quick past its 10 minutes
        configs[MORE] = RunConfig(
            name=MORE,
            methods=_lora(SIX),
            pruning={**pruning, "head_ratio": 0.5, "ffn_ratio": 0.5},
            **common,
        )
    return configs


def pruning_settings(quick: bool, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The Light-PEFT run's ``pruning`` section: the early phase of the mode (0.35 of the run
    with ``quick``, else 0.2; see :func:`run`) and the paper's ratios, then ``overrides``."""
    return {"method": "light-peft", "early_steps": 0.35 if quick else 0.2, **(overrides or {})}


def build_for_timing(run_dir: Path) -> nn.Module:
    """The trained model of the run in ``run_dir`` (LoRA on a fresh base, or the pruned
    backbone), rebuilt as ``slimtune eval`` rebuilds it (:func:`slimtune.app.rebuild.rebuild`),
    in float32."""
    from slimtune.app.rebuild import rebuild

    return rebuild(run_dir).model.float()


def _merged(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with its LoRA folded into the weights: the model as deployed."""
    import slimtune

    out = copy.deepcopy(model)
    slimtune.merge(out)
    return out


def _inputs(
    model: nn.Module, kind: str, seed: int = 0, batch: int = BATCH, seq: int = SEQ
) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    if kind == "text":
        config: Any = model.config
        vocab = int(config.vocab_size)
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return {"pixel_values": torch.randn(batch, 3, 112, 112, generator=g)}


def _logits(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    out = model(**inputs)
    return getattr(out, "logits", out)


def train_step_fn(
    model: nn.Module, inputs: dict[str, Tensor], dropout: bool = True
) -> Callable[[], None]:
    """Forward + backward + AdamW step of the trainable parameters.

    ``dropout=False`` runs the same step in eval mode: every dropout off (the backbone's and
    LoRA's), to measure what dropout costs.
    """
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 2, (len(next(iter(inputs.values()))),), generator=g)

    def step() -> None:
        model.train(dropout)
        loss = nn.functional.cross_entropy(_logits(model, inputs), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def infer_step_fn(model: nn.Module, inputs: dict[str, Tensor]) -> Callable[[], None]:
    """A forward pass in eval mode without gradients."""

    def step() -> None:
        model.eval()
        with torch.no_grad():
            _logits(model, inputs)

    return step


def _interleaved(
    fns: dict[str, Callable[[], None]],
    warmup: int,
    steps: int,
    what: str,
    steal: dict[str, float | None] | None = None,
) -> dict[str, list[float]]:
    """Step times of each function, steps interleaved; ``steal[what]``: the fraction of CPU
    time the hypervisor stole meanwhile (:func:`benchmarks.steal_fraction`)."""
    from benchmarks.common import cpu_counters, steal_fraction

    before = cpu_counters()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(warmup + steps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if i >= warmup:
                times[name].append(dt)
        print(f"\r{what} step {i + 1}/{warmup + steps}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    if steal is not None:
        steal[what] = steal_fraction(before)
    return times


def _time(
    models: dict[str, nn.Module],
    inputs: dict[str, dict[str, Tensor]],
    warmup: int,
    steps: int,
    what: str,
    steal: dict[str, float | None] | None = None,
    no_dropout: Sequence[str] = ("lora-qv", "light-peft"),
) -> dict[str, dict[str, list[float]]]:
    """Interleaved step times per method: ``train``, ``infer`` (merged), ``infer_unmerged``, and
    ``train_no_dropout`` (the methods in ``no_dropout``: the training step with every dropout
    off)."""
    fns = {m: train_step_fn(models[m], inputs[m]) for m in models}
    for m in no_dropout:
        fns[f"{m}{NODROP}"] = train_step_fn(models[m], inputs[m], dropout=False)
    train_all = _interleaved(fns, warmup, steps, f"train, {what}", steal)
    train_t = {m: train_all[m] for m in models}
    nodrop = {m: train_all[f"{m}{NODROP}"] for m in no_dropout}
    deployed = {m: _merged(models[m]) for m in models}
    both = {m: infer_step_fn(deployed[m], inputs[m]) for m in models}
    both.update({f"{m}{UNMERGED}": infer_step_fn(models[m], inputs[m]) for m in models})
    infer_all = _interleaved(both, warmup, steps, f"inference, {what}", steal)
    infer_t = {m: infer_all[m] for m in models}
    infer_u = {m: infer_all[f"{m}{UNMERGED}"] for m in models}
    return {
        "train": train_t,
        "infer": infer_t,
        "infer_unmerged": infer_u,
        "train_no_dropout": nodrop,
    }


def _child_memory(kind: str, run_dir: Path, model_name: str = "minilm") -> dict[str, float]:
    """Body of the memory subprocess: peak RSS of 2 inference steps, then of 2 training steps."""
    track_live_memory()
    model = build_for_timing(run_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    batch, seq = TIMING_SHAPE.get(model_name, (BATCH, SEQ))
    inputs = {k: v.to(device) for k, v in _inputs(model, kind, batch=batch, seq=seq).items()}
    import slimtune

    infer, train = infer_step_fn(model, inputs), train_step_fn(model, inputs)
    slimtune.merge(model)  # inference as deployed, then training on the unmerged model
    reset_peak(device)
    for _ in range(2):
        infer()
    infer_mb = peak_mb(device)
    slimtune.unmerge(model)
    reset_peak(device)
    for _ in range(2):
        train()
    return {"infer_mb": round(infer_mb, 1), "train_mb": round(peak_mb(device), 1)}


def _memory(method: str, kind: str, run_dir: Path, model: str = "minilm") -> dict[str, float]:
    args = ["--memory-of", method, "--kind", kind, "--run-dir", str(run_dir), "--model", model]
    return run_child("benchmarks.lightpeft", args, f"memory of {method}")


def _sps(times: dict[str, list[float]], batch: int = BATCH) -> dict[str, float]:
    """Samples per second per method: the batch over the median step time."""
    return {m: batch / statistics.median(v) for m, v in times.items()}


def parse_early_steps(text: str) -> int | float:
    """``"50"`` -> 50 steps, ``"0.35"`` -> a fraction of the run (checked by the run config)."""
    return int(text) if text.strip().isdigit() else float(text)


def add_pruning_options(ap: argparse.ArgumentParser) -> None:
    """``--head-ratio``, ``--ffn-ratio``, ``--module-ratio``, ``--rank-ratio``,
    ``--early-steps``, ``--rescore-steps``, ``--backbone-score`` and ``--compensate`` (read back with
    :func:`pruning_overrides`)."""
    for key in RATIOS:
        ap.add_argument(
            f"--{key.replace('_', '-')}",
            type=float,
            default=None,
            help=f"Light-PEFT's {key} (default: the paper's)",
        )
    ap.add_argument(
        "--early-steps",
        type=parse_early_steps,
        default=None,
        help="Light-PEFT's early phase: steps (integer) or a fraction of the run "
        "(default 0.35 with --quick, else 0.2)",
    )
    ap.add_argument(
        "--rescore-steps",
        type=parse_early_steps,
        default=None,
        help="score the PEFT modules again on the pruned backbone for this many steps "
        "(or a fraction of the run; default 0: off, the paper's)",
    )
    ap.add_argument(
        "--backbone-score",
        choices=BACKBONE_SCORES,
        default=None,
        help="what ranks heads and FFN neurons: the trained masks (default, the paper's), "
        "their first-order importance |m dL/dm|, or random scores (a control)",
    )
    ap.add_argument(
        "--compensate",
        action="store_const",
        const=True,
        default=None,
        help="add the removed heads' and neurons' mean contribution to the biases of o and fc2 "
        "(off by default, the paper's)",
    )


def pruning_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The Light-PEFT settings given by :func:`add_pruning_options`' options."""
    keys = (*RATIOS, "early_steps", "rescore_steps", "backbone_score", "compensate")
    return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


def parse_threads(text: str) -> list[int]:
    """``"2,1"`` -> ``[2, 1]`` (empty: ``[]``, every core).

    Raises:
        ValueError: not comma-separated integers >= 1.
    """
    try:
        threads = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        threads = [0]
    if any(t < 1 for t in threads):
        raise ValueError(
            f"timing threads are comma-separated integers >= 1, e.g. 2,1; got {text!r}"
        )
    return threads


def _speed_summary(times: dict[str, dict[str, list[float]]], batch: int = BATCH) -> dict[str, Any]:
    """Samples/s per method and light-peft's speedups over lora-qv from :func:`_time`'s times.

    The speedups are ratios of median step times; ``speedup_ci`` gives, per step kind, the
    median of the per-round ratios and its confidence interval
    (:func:`benchmarks.paired_speedup`): how far the machine's noise leaves them open.
    """
    from benchmarks.common import paired_speedup

    tr, inf = _sps(times["train"], batch), _sps(times["infer"], batch)
    unm = _sps(times["infer_unmerged"], batch)
    nodrop = _sps(times["train_no_dropout"], batch)
    return {
        "train_no_dropout_samples_per_s": {m: round(v, 2) for m, v in nodrop.items()},
        "train_speedup_without_dropout": round(nodrop["light-peft"] / nodrop["lora-qv"], 3),
        "train_samples_per_s": {m: round(v, 2) for m, v in tr.items()},
        "infer_samples_per_s": {m: round(v, 2) for m, v in inf.items()},
        "infer_unmerged_samples_per_s": {m: round(v, 2) for m, v in unm.items()},
        "train_speedup": round(tr["light-peft"] / tr["lora-qv"], 3),
        "infer_speedup": round(inf["light-peft"] / inf["lora-qv"], 3),
        "infer_speedup_unmerged": round(unm["light-peft"] / unm["lora-qv"], 3),
        "speedup_ci": {
            what: paired_speedup(by["lora-qv"], by["light-peft"]) for what, by in times.items()
        },
    }


def compare(
    model_name: str,
    task: str,
    quick: bool,
    work: Path,
    pruning: dict[str, Any],
    timing: tuple[int, int],
    timing_threads: Sequence[int] = (),
    model_dropout: float | None = None,
    fast_dropout: bool = True,
) -> dict[str, Any]:
    """Train the three methods on one model/task, then time and measure them."""
    import slimtune
    from benchmarks.common import cores
    from slimtune.app.loop import train

    configs = run_configs(model_name, task, quick, pruning, model_dropout, fast_dropout)
    runs: dict[str, dict[str, Any]] = {}

    def one(method: str) -> None:
        t0 = time.perf_counter()
        print(f"[{model_name}/{task}] training {method} ...", file=sys.stderr, flush=True)
        if parallel:
            args = ["--train-of", method, "--model", model_name, "--task", task]
            args += ["--run-dir", str(work / method), "--pruning", json.dumps(pruning)]
            if model_dropout is not None:
                args += ["--model-dropout", str(model_dropout)]
            if not fast_dropout:
                args += ["--torch-dropout"]
            res = run_child("benchmarks.lightpeft", args + ["--quick"] * quick, method)
        else:
            res = train(configs[method], work / method, progress=False)
        res["wall_s"] = round(time.perf_counter() - t0, 1)
        runs[method] = res
        print(
            f"[{model_name}/{task}] {method}: test acc {res['test']['accuracy']:.4f} "
            f"({res['wall_s']} s)",
            file=sys.stderr,
            flush=True,
        )

    # On a CPU with a few cores, two single-threaded runs side by side finish sooner than one
    # after the other with all threads (small GEMMs do not scale to every core).
    parallel = not torch.cuda.is_available() and cores() >= 2
    if parallel:
        with ThreadPoolExecutor(max_workers=2) as pool:
            list(pool.map(one, list(configs)))
    else:
        for method in configs:
            one(method)
    runs = {m: runs[m] for m in configs}
    from slimtune.app.data.registry import task_kind

    kind = task_kind(task)
    batch, seq = TIMING_SHAPE.get(model_name, (BATCH, SEQ))
    timed = tuple(configs)
    models = {m: build_for_timing(work / m) for m in timed}
    sizes = {m: slimtune.summary(models[m]) for m in timed}
    inputs = {m: _inputs(models[m], kind, batch=batch, seq=seq) for m in timed}
    warmup, steps = timing
    threads = list(timing_threads) if timing_threads else [torch.get_num_threads()]
    speed = {}
    steal: dict[str, float | None] = {}
    for n in threads:
        torch.set_num_threads(n)
        speed[n] = _time(models, inputs, warmup, steps, f"{n} thread{'s' * (n > 1)}", steal)
    torch.set_num_threads(threads[0])
    times = speed[threads[0]]
    top = _speed_summary(times, batch)
    del models
    mem = {m: _memory(m, kind, work / m, model_name) for m in METHODS}
    train_sps, infer_sps = _sps(times["train"], batch), _sps(times["infer"], batch)
    infer_u_sps = _sps(times["infer_unmerged"], batch)
    pr = runs["light-peft"]["pruning"]
    result: dict[str, Any] = {
        "model": model_name,
        "acc": {m: runs[m]["test"]["accuracy"] for m in METHODS},
        "val_acc": {m: runs[m]["val"]["accuracy"] for m in METHODS},
        "train_samples_per_s": top["train_samples_per_s"],
        "infer_samples_per_s": top["infer_samples_per_s"],
        "peak_train_mem_mb": {m: mem[m]["train_mb"] for m in METHODS},
        "infer_mem_mb": {m: mem[m]["infer_mb"] for m in METHODS},
        "backbone_params": {m: sizes[m].base for m in METHODS},
        "trainable_params": {m: sizes[m].trainable for m in METHODS},
        "train_speedup": top["train_speedup"],
        "infer_speedup": top["infer_speedup"],
        "infer_unmerged_samples_per_s": top["infer_unmerged_samples_per_s"],
        "infer_speedup_unmerged": top["infer_speedup_unmerged"],
        "train_speedup_without_dropout": top["train_speedup_without_dropout"],
        "speedup_ci": top["speedup_ci"],
        "pruned_fraction": round(pr["pruned_fraction"], 4),
        "cpu_steal_fraction": steal,
        "trainable_vs_lora_all": round(
            sizes["light-peft"].trainable / sizes["lora-all"].trainable, 4
        ),
        "acc_delta_vs_lora_qv": round(
            runs["light-peft"]["test"]["accuracy"] - runs["lora-qv"]["test"]["accuracy"], 4
        ),
        "pruning": {k: v for k, v in pr.items() if k != "config"},
        "pruning_config": pr["config"],
        "run_wall_s": {m: runs[m]["wall_s"] for m in timed},
        "train_s": {m: round(runs[m]["train_s"], 1) for m in timed},
        "step_times_s": {
            what: {m: [round(t, 4) for t in v] for m, v in by.items()} for what, by in times.items()
        },
        "setup": {
            "model": model_name,
            "task": task,
            "data": configs["lora-qv"].to_dict()["data"],
            "train": configs["lora-qv"].to_dict()["train"],
            "lora": _lora(["q", "v"])[0],
            "timing_batch": batch,
            "timing_seq": seq if kind == "text" else None,
            "timing_warmup": warmup,
            "timing_steps": steps,
            "timing_threads": threads,
            "model_dropout": "checkpoint's own" if model_dropout is None else model_dropout,
            "fast_dropout": fast_dropout,
        },
    }
    if len(threads) > 1:
        result["by_threads"] = {str(n): _speed_summary(speed[n], batch) for n in threads}
    if MORE in runs:
        more = runs[MORE]
        result.update(
            {
                MORE: {
                    "what": "Light-PEFT removing 1/2 of the heads (per layer) and of the FFN neurons",
                    "acc": more["test"]["accuracy"],
                    "val_acc": more["val"]["accuracy"],
                    "train_samples_per_s": round(train_sps[MORE], 2),
                    "infer_samples_per_s": round(infer_sps[MORE], 2),
                    "backbone_params": sizes[MORE].base,
                    "trainable_params": sizes[MORE].trainable,
                    "train_speedup": round(train_sps[MORE] / train_sps["lora-qv"], 3),
                    "infer_speedup": round(infer_sps[MORE] / infer_sps["lora-qv"], 3),
                    "infer_speedup_unmerged": round(infer_u_sps[MORE] / infer_u_sps["lora-qv"], 3),
                    "pruned_fraction": round(more["pruning"]["pruned_fraction"], 4),
                    "acc_delta_vs_lora_qv": round(
                        more["test"]["accuracy"] - runs["lora-qv"]["test"]["accuracy"], 4
                    ),
                }
            }
        )
    return result


def run(
    quick: bool = False,
    out: str | None = None,
    timing_threads: Sequence[int] = (),
    model_dropout: float | None = None,
    fast_dropout: bool = True,
    pruning: dict[str, Any] | None = None,
    timing_steps: int | None = None,
    keep: str | os.PathLike[str] | None = None,
    model: str = "minilm",
    task: str = "amazon-reviews",
) -> dict[str, Any]:
    """Run the benchmark, print and save the JSON, and return it.

    Args:
        quick: ``minilm`` on ``amazon-reviews`` only, 800 training examples of 64 tokens,
            3 epochs, 5 timed steps (under 10 minutes on 2 CPU cores); the full mode uses all
            4000 training reviews (3500 train + 500 validation) of 128 tokens, the whole
            1000-review test split, 20 timed steps and adds ``dinov2-s`` on ``fashion-mnist``
            (under ``"dinov2-s/fashion-mnist"``).
        out: JSON path (default ``benchmarks/results/lightpeft[_quick].json``); the full
            mode writes the minilm figures there (with a ``partial`` key) before it starts
            dinov2-s, so a failure or a stop in the second model keeps the first.
        timing_threads: thread counts to time the steps with (default: every core); the first
            gives the top-level speed keys, each one a ``by_threads.<n>`` entry when there
            are several (on CPU the training runs use 1 thread each, two runs side by side).
        model_dropout: the backbone's dropout probability for every method (``None``: the
            checkpoint's own, 0.1 for minilm).
        fast_dropout: the run configs' ``fast_dropout`` for every method (``False``: torch's
            own dropout, as ``--torch-dropout``).
        pruning: Light-PEFT settings other than the defaults, e.g. ``{"head_ratio": 0.4,
            "ffn_ratio": 0.4}`` (keys of :class:`slimtune.passes.lightpeft.LightPEFTConfig`).
            The defaults are the paper's ratios and an early phase of 0.35 of the run in
            ``--quick`` (52 of its 150 steps) and 0.2 in the full mode (131 of minilm's 657
            steps, 75 of dinov2-s's 375): with 30 steps (0.2 of the quick run) the masks had
            not separated the heads and neurons yet (test accuracy 0.764 and 0.764 against
            0.782 and 0.792 at 0.35 for seeds 1 and 2; validation 0.755/0.795 against
            0.785/0.815), nor with dinov2-s's 38 (0.1 of its run: 0.808 against 0.840 with 75
            steps and 0.841 for lora-qv; docs/lightpeft.md).
        timing_steps: timed steps of each kind per method (default 5 with ``quick``, else 20;
            one round of all methods per step, so the time grows with it): more rounds narrow
            ``speedup_ci`` on a noisy machine.
        keep: a new or empty directory to keep the trained runs in (``<model>/<method>``: run
            configs, adapters, the pruned backbone, reports), instead of a temporary one.
        model, task: another model and task to compare on instead (only that pair, no
            second model; default JSON ``lightpeft_<model>[_quick].json``). ``smollm2-135m``
            on ``movie-sentiment`` runs 400 (full: 2000) training snippets of at most 64
            (96) tokens for 2 epochs at learning rate 5e-4 and times 8 x 128 tokens.

    Returns:
        ``acc``, ``train_samples_per_s``, ``infer_samples_per_s``, ``peak_train_mem_mb``,
        ``infer_mem_mb``, ``backbone_params``, ``trainable_params`` (each per method:
        ``lora-qv``, ``lora-all``, ``light-peft``), ``train_speedup``, ``infer_speedup``
        (light-peft over lora-qv), ``pruned_fraction``, and the setup, machine and pruning
        details.

    Raises:
        BenchError: ``timing_steps`` below 1, or ``keep`` is a file or a directory with
            something in it (checked before any training).
    """
    from benchmarks.common import BenchError, cores, emit, machine_info

    if timing_steps is not None and timing_steps < 1:
        raise BenchError(f"timing steps must be at least 1, got {timing_steps}")
    if keep is not None:
        kept = Path(keep)
        if kept.exists() and (not kept.is_dir() or any(kept.iterdir())):
            raise BenchError(f"--keep {kept}: not a new or empty directory")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(cores())
    t0 = time.perf_counter()
    settings = pruning_settings(quick, pruning)
    timing = (1, 5) if quick else (3, 20)
    if timing_steps is not None:
        timing = (timing[0], timing_steps)
    stem = "lightpeft" if model == "minilm" else f"lightpeft_{model}"
    path = Path(out) if out else RESULTS / (f"{stem}_quick.json" if quick else f"{stem}.json")
    with contextlib.ExitStack() as stack:
        if keep is None:
            work = Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="slimtune-lightpeft-"))
            )
        else:
            work = Path(keep)
            work.mkdir(parents=True, exist_ok=True)
        result = compare(
            model,
            task,
            quick,
            work / model,
            settings,
            timing,
            timing_threads,
            model_dropout,
            fast_dropout,
        )
        png = work / model / "light-peft" / "pruning.png"
        if png.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(png, path.with_name(path.stem + "_pruning.png"))
        if not quick and model == "minilm":
            # the second model takes as long again: keep the first one's figures meanwhile
            from slimtune.io import atomic_write_text

            partial = {**result, "partial": "dinov2-s/fashion-mnist not run yet"}
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(partial, indent=1) + "\n")
            print(f"saved the minilm part to {path}", file=sys.stderr, flush=True)
            result["dinov2-s/fashion-mnist"] = compare(
                "dinov2-s",
                "fashion-mnist",
                quick,
                work / "dinov2",
                settings,
                timing,
                timing_threads,
                model_dropout,
                fast_dropout,
            )
    result["mem_method"] = (
        "cuda max_memory_allocated"
        if torch.cuda.is_available()
        else "RSS high-water mark (VmHWM via /proc, reset after building the model), fresh "
        "subprocess per method; includes interpreter, libraries and weights"
    )
    shape = result.get("setup", {})
    result["speed_method"] = (
        f"median wall-clock of interleaved steps on a fixed batch of "
        f"{shape.get('timing_batch', BATCH)} x {shape.get('timing_seq', SEQ)} random "
        "tokens (full attention mask); samples/s = batch / median step time; inference on "
        "the merged model (as deployed), infer_unmerged_* with LoRA kept separate"
    )
    result["quick"] = quick
    result["runs_kept_in"] = None if keep is None else str(keep)
    result["total_s"] = round(time.perf_counter() - t0, 1)
    result["machine"] = machine_info(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    emit(result, path)
    return result


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``python -m benchmarks.lightpeft``)."""
    ap = argparse.ArgumentParser(
        prog="slimtune bench lightpeft", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--quick", action="store_true", help="the small version")
    ap.add_argument("--out", default=None, help="JSON output path")
    ap.add_argument(
        "--timing-threads",
        default="",
        help="comma-separated thread counts to time the steps with, e.g. 2,1 (default: all cores)",
    )
    ap.add_argument(
        "--model-dropout",
        type=float,
        default=None,
        help="dropout probability of the backbone for every method (default: the checkpoint's)",
    )
    ap.add_argument(
        "--torch-dropout",
        action="store_true",
        help="train every method with torch's own dropout (default: fast_dropout, see "
        "slimtune.dropout)",
    )
    add_pruning_options(ap)
    ap.add_argument(
        "--timing-steps",
        type=int,
        default=None,
        help="timed steps per method and step kind (default 5 with --quick, else 20)",
    )
    ap.add_argument(
        "--keep", default=None, help="a new or empty directory to keep the trained runs in"
    )
    ap.add_argument("--memory-of", choices=METHODS, help=argparse.SUPPRESS)
    ap.add_argument(
        "--model",
        default="minilm",
        help="model to compare on (default minilm; e.g. smollm2-135m, with --task movie-sentiment)",
    )
    ap.add_argument("--kind", default="text", help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--train-of", choices=[*METHODS, MORE], help=argparse.SUPPRESS)
    ap.add_argument(
        "--task", default="amazon-reviews", help="task of --model (default amazon-reviews)"
    )
    ap.add_argument("--pruning", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.train_of:
        from slimtune.app.loop import train

        torch.set_num_threads(1)
        cfg = run_configs(
            args.model,
            args.task,
            args.quick,
            json.loads(args.pruning),
            args.model_dropout,
            not args.torch_dropout,
        )
        res = train(cfg[args.train_of], Path(args.run_dir), progress=False)
        print(json.dumps(res))
        return 0
    if args.memory_of:
        from benchmarks.common import cores

        torch.set_num_threads(cores())
        res = _child_memory(args.kind, Path(args.run_dir), args.model)
        print(json.dumps(res))
        return 0
    try:
        threads = parse_threads(args.timing_threads)
    except ValueError as exc:
        ap.error(f"--timing-threads: {exc}")
    pruning = pruning_overrides(args)
    from benchmarks.common import BenchError

    try:
        run(
            quick=args.quick,
            out=args.out,
            timing_threads=threads,
            model_dropout=args.model_dropout,
            fast_dropout=not args.torch_dropout,
            pruning=pruning,
            timing_steps=args.timing_steps,
            keep=args.keep,
            model=args.model,
            task=args.task,
        )
    except BenchError as exc:
        ap.error(str(exc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
