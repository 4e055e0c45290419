"""LoRA on a quantized frozen base (QLoRA-style) against the float base and peft + bitsandbytes.

Model ``smollm2-135m`` (SmolLM2-135M-Instruct, 30 Llama layers) as a 2-class sequence classifier
(last-token pooling, new ``score`` head) on ``movie-sentiment``; LoRA r=8, alpha=16, dropout 0.1
(QLoRA's setting for small models) on q and v, AdamW lr 3e-4, batch 8 (at most 64 tokens), and
gradient checkpointing (QLoRA's recipe; ``--no-checkpointing`` keeps every activation) for every
variant, with the same data order, seed and initial LoRA/head values:

* ``fp32``: slimtune LoRA on the float base;
* ``4bit``: ``slimtune.quantize_base(model, bits=4)`` (NF4, blocks of 64, double-quantized
  absmax; bitsandbytes ``Linear4bit``) then slimtune LoRA;
* ``8bit``: ``quantize_base(model, bits=8)`` (bitsandbytes ``Linear8bitLt``, int8 rows);
* ``peft-4bit``: what peft users do: ``from_pretrained(quantization_config=BitsAndBytesConfig(
  load_in_4bit, nf4, double quant, compute dtype float32))``, ``prepare_model_for_kbit_training``
  (without gradient checkpointing, as the others), ``get_peft_model`` with the same LoRA.
* ``4bit+emb`` (beyond QLoRA, weights only, not trained): ``quantize_base(..., embeddings=True)``,
  int8 embedding rows.

Measured per variant, each in a fresh process: ``weights_mb`` (parameters, buffers and
quantization state in memory, each tensor once), ``peak_train_mem_mb`` (RSS high-water mark
while training minus the RSS of the same process before the model was built: the model's
weights, activations, gradients and optimizer state, not the libraries and the data),
``peak_rss_mb`` (the raw high-water mark, libraries included), ``acc`` on the test
snippets after training. ``step_s`` comes from one more process that builds the fp32, 4-bit,
8-bit and peft-4bit models and interleaves their training steps (paired; median of the
measured steps; ``ratio.<variant>`` = its step time over peft-4bit's, per round then median).

``backends``: one 576 x 1536 linear, forward + backward to its input over 512 tokens, for each
installed backend (bitsandbytes, torchao, optimum-quanto, hqq): the comparison that made
bitsandbytes slimtune's default (see ``docs/qbase.md``).

Run ``slimtune bench qbase [--quick] [--out FILE]`` or ``python -m benchmarks.qbase --quick``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.common import emit, machine_info
from slimtune.io import atomic_write_text

OUT = Path(__file__).parent / "results" / "qbase.json"
PARTS = Path(__file__).parent / "results" / "qbase_parts"
VARIANTS = ("fp32", "4bit", "8bit", "peft-4bit")
WEIGHTS_ONLY = ("4bit+emb",)
MODEL = "smollm2-135m"
LORA = {"r": 8, "alpha": 16, "dropout": 0.1}


def _settings(quick: bool) -> dict[str, Any]:
    return {
        "n_train": 960 if quick else 4000,
        "n_test": 400 if quick else 2000,
        "steps": 100 if quick else 500,
        "batch": 8,
        "max_length": 64,
        "lr": 3e-4,
        "seed": 0,
        "timed_rounds": 6 if quick else 20,
        "warmup": 2,
    }


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging

        logging.set_verbosity_error()
        logging.disable_progress_bar()
    except ImportError:
        pass


def build(variant: str, seed: int, checkpointing: bool = True) -> nn.Module:
    """The variant's model with LoRA applied (trainable: LoRA and the head).

    ``checkpointing``: recompute each decoder layer's activations in the backward pass
    (transformers' gradient checkpointing, non-reentrant), as QLoRA's recipe does; the same
    for every variant."""
    import slimtune
    from slimtune import LoRA
    from slimtune.models.gguf import smollm2_folder
    from slimtune.models.loader import load_model

    torch.manual_seed(seed)
    if variant == "peft-4bit":
        import peft
        from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

        cfg = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
        folder = str(smollm2_folder(None))
        base = AutoModelForSequenceClassification.from_pretrained(
            folder, num_labels=2, quantization_config=cfg, dtype=torch.float32, device_map="cpu"
        )
        base.config.pad_token_id = base.config.eos_token_id
        base = peft.prepare_model_for_kbit_training(
            base,
            use_gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
        model: nn.Module = peft.get_peft_model(
            base,
            peft.LoraConfig(
                r=int(LORA["r"]),
                lora_alpha=int(LORA["alpha"]),
                lora_dropout=LORA["dropout"],
                target_modules=["q_proj", "v_proj"],
                task_type="SEQ_CLS",
            ),
        )
    else:
        loaded, _ = load_model(MODEL, 2)
        hf: Any = loaded
        hf.config.pad_token_id = hf.config.eos_token_id
        model = loaded
        if variant != "fp32":
            slimtune.quantize_base(
                model, bits=8 if variant == "8bit" else 4, embeddings=variant == "4bit+emb"
            )
        if checkpointing:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        slimtune.apply(model, [LoRA(targets=["q", "v"], **LORA)])  # type: ignore[arg-type]
    _same_init(model, seed)
    return model


@torch.no_grad()
def _same_init(model: nn.Module, seed: int) -> None:
    """The same LoRA A and head values in every variant (by role and shape), B = 0."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters(), key=lambda kv: _key(kv[0])):
        if not p.requires_grad:
            continue
        if "lora_B" in name:
            p.zero_()
        else:
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def _key(name: str) -> str:
    """Parameter names of slimtune and peft models in one order (layer, q/v, A/B, head)."""
    for junk in (
        "base_model.model.",
        ".default",
        ".base_layer",
        "modules_to_save.",
        "original_module.",
    ):
        name = name.replace(junk, "")
    return name.replace("lora_A.weight", "lora_A").replace("lora_B.weight", "lora_B")


def _data(s: dict[str, Any]) -> Any:
    from slimtune.app.data.decoder import load_movie_sentiment
    from slimtune.models.gguf import smollm2_folder

    return load_movie_sentiment(
        str(smollm2_folder(None)),
        max_length=s["max_length"],
        seed=s["seed"],
        n_train=s["n_train"],
        n_val=8,
        n_test=s["n_test"],
    )


def _batches(task: Any, s: dict[str, Any], split: str = "train") -> list[dict[str, torch.Tensor]]:
    from torch.utils.data import DataLoader

    data = getattr(task, split)
    g = torch.Generator().manual_seed(s["seed"])
    return list(
        DataLoader(
            data,
            batch_size=s["batch"],
            shuffle=split == "train",
            generator=g,
            collate_fn=task.collate,
        )
    )


def _step(model: nn.Module, opt: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> float:
    model.train()
    out = model(**batch)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(out.loss)


@torch.no_grad()
def _accuracy(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    model.eval()
    right = total = 0
    for b in batches:
        logits = model(**{k: v for k, v in b.items() if k != "labels"}).logits
        right += int((logits.argmax(-1) == b["labels"]).sum())
        total += len(b["labels"])
    return right / total


def _optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)


def _import_all() -> None:
    """Every library any variant uses, imported before memory is measured (so that the
    baseline holds the same libraries for every variant)."""
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig  # noqa: F401


def child_weights(variant: str) -> dict[str, Any]:
    """Build a variant and count its weights (no training)."""
    import slimtune
    from slimtune.models.loader import load_model
    from slimtune.qbase import weights_bytes

    assert variant == "4bit+emb"
    model, _ = load_model(MODEL, 2)
    slimtune.quantize_base(model, bits=4, embeddings=True)
    return {"weights_mb": weights_bytes(model)["mb"]}


def child_train(variant: str, quick: bool, checkpointing: bool) -> dict[str, Any]:
    """Train one variant (fresh process): weights, peak memory while training, accuracy."""
    from benchmarks.memory import peak_mb, reset_peak, track_live_memory
    from slimtune.qbase import weights_bytes

    track_live_memory()
    _import_all()
    s = _settings(quick)
    task = _data(s)
    train, test = _batches(task, s), _batches(task, s, "test")
    start = reset_peak()["before_mb"]  # libraries and data, no model yet
    model = build(variant, s["seed"], checkpointing)
    weights = weights_bytes(model)["mb"]
    opt = _optimizer(model, s["lr"])
    before = reset_peak()  # the float checkpoint a quantized variant was built from is gone
    losses, t0 = [], time.perf_counter()
    for i in range(s["steps"]):
        losses.append(_step(model, opt, train[i % len(train)]))
    train_s = time.perf_counter() - t0
    peak = peak_mb()
    return {
        "weights_mb": weights,
        "peak_rss_mb": peak,
        "peak_train_mem_mb": peak - start,
        "rss_no_model_mb": start,
        "rss_model_built_mb": before["before_mb"],
        "train_s": train_s,
        "loss_first10": statistics.mean(losses[:10]),
        "loss_last10": statistics.mean(losses[-10:]),
        "acc": _accuracy(model, test),
    }


def child_time(quick: bool, checkpointing: bool) -> dict[str, Any]:
    """Interleaved training steps of the variants in one process (paired)."""
    s = _settings(quick)
    task = _data(s)
    train = _batches(task, s)
    models = {v: build(v, s["seed"], checkpointing) for v in VARIANTS}
    opts = {v: _optimizer(m, s["lr"]) for v, m in models.items()}
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(s["warmup"] + s["timed_rounds"]):
        order = VARIANTS if r % 2 == 0 else tuple(reversed(VARIANTS))
        for v in order:
            t = time.perf_counter()
            _step(models[v], opts[v], train[r % len(train)])
            if r >= s["warmup"]:
                times[v].append(time.perf_counter() - t)
    ratio = {
        v: statistics.median(a / b for a, b in zip(times[v], times["peft-4bit"], strict=True))
        for v in VARIANTS
    }
    return {
        "step_s": {v: statistics.median(t) for v, t in times.items()},
        "ratio_vs_peft_4bit": ratio,
        "rounds": s["timed_rounds"],
    }


def _nbytes(t: torch.Tensor) -> int:
    """Bytes of a tensor, or of the plain tensors inside a tensor subclass (torchao, quanto)."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if callable(flatten) and type(t) is not torch.Tensor and type(t) is not nn.Parameter:
        names, _ = flatten()
        return sum(_nbytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def backends(rounds: int = 8) -> dict[str, Any]:
    """One linear (576 -> 1536, 512 tokens), forward + backward to the input, per backend."""
    import copy

    torch.manual_seed(0)
    lin = nn.Linear(576, 1536, bias=False)
    x0 = torch.randn(512, 576)
    ref = lin(x0).detach()
    out: dict[str, Any] = {}
    mods: dict[str, tuple[nn.Module, int]] = {}

    def measure(name: str, module: nn.Module, weight_bytes: int) -> None:
        module.requires_grad_(False)
        with torch.no_grad():
            y = module(x0).float()
        mods[name] = (module, weight_bytes)
        out[name] = {"rel_err": float((y - ref).norm() / ref.norm()), "weight_bytes": weight_bytes}

    measure("fp32", lin, lin.weight.numel() * 4)
    from slimtune.qbase import weights_bytes
    from slimtune.qbase.layers import quantize_linear
    from slimtune.qbase.spec import BaseQuant

    for kind in ("nf4", "int8"):
        q = quantize_linear(lin.weight, None, BaseQuant(kind=kind))
        measure(f"bitsandbytes-{kind}", q, weights_bytes(q)["bytes"])
    try:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

        m = copy.deepcopy(lin)
        m.weight = nn.Parameter(to_nf4(lin.weight.detach().clone(), 64, 256), requires_grad=False)
        measure("torchao-nf4", m, _nbytes(m.weight))
    except Exception as exc:  # noqa: BLE001 - optional backends: report why not
        out["torchao-nf4"] = {"error": repr(exc)[:200]}
    try:
        from optimum.quanto import freeze, qint4, qint8, quantize

        for qt, name in ((qint4, "quanto-int4"), (qint8, "quanto-int8")):
            seq = nn.Sequential(copy.deepcopy(lin))
            quantize(seq, weights=qt)  # quanto's default group size
            freeze(seq)
            measure(name, seq, sum(_nbytes(t) for t in seq.state_dict().values()))
    except Exception as exc:  # noqa: BLE001
        out["quanto"] = {"error": repr(exc)[:200]}
    try:
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

        h: nn.Module = HQQLinear(
            copy.deepcopy(lin),
            BaseQuantizeConfig(nbits=4, group_size=64),
            compute_dtype=torch.float32,
            device="cpu",
        )
        measure(
            "hqq-4bit",
            h,
            sum(_nbytes(t) for t in h.state_dict().values() if isinstance(t, torch.Tensor)),
        )
    except Exception as exc:  # noqa: BLE001
        out["hqq-4bit"] = {"error": repr(exc)[:200]}
    # interleaved rounds (machines are noisy): 3 steps of each backend per round
    x = x0.clone().requires_grad_(True)
    times: dict[str, list[float]] = {n: [] for n in mods}
    for r in range(rounds + 1):
        for n, (mod, _) in mods.items():
            t0 = time.perf_counter()
            for _ in range(3):
                mod(x).float().sum().backward()
            if r:  # round 0 warms up
                times[n].append((time.perf_counter() - t0) / 3 * 1e3)
    for n, ms in times.items():
        out[n]["fwd_bwd_ms"] = statistics.median(ms)
        out[n]["vs_fp32"] = statistics.median(a / b for a, b in zip(ms, times["fp32"], strict=True))
    return out


def _spawn(args: list[str]) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    res = subprocess.run(
        [sys.executable, "-m", "benchmarks.qbase", *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    lines = [line for line in res.stdout.splitlines() if line.startswith("{")]
    if res.returncode != 0 or not lines:
        raise RuntimeError(f"child {args} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return dict(json.loads(lines[-1]))


def run(
    quick: bool = False, out: str | None = None, checkpointing: bool = True, resume: bool = False
) -> dict[str, Any]:
    """All variants, then the interleaved timing. Each variant's result is kept under
    ``benchmarks/results/qbase_parts/<mode>/`` as it finishes; ``resume`` reuses those measured
    with the same settings (a long run that stopped goes on where it was)."""
    s = _settings(quick)
    flags = (["--quick"] if quick else []) + ([] if checkpointing else ["--no-checkpointing"])
    result: dict[str, Any] = {
        "benchmark": "qbase",
        "mode": "quick" if quick else "full",
        "model": MODEL,
        "task": "movie-sentiment",
        "settings": {**s, "lora": LORA, "targets": ["q", "v"], "checkpointing": checkpointing},
        "machine": machine_info(torch.device("cpu")),
    }
    print("backends (one linear, forward + backward):", flush=True)
    result["backends"] = backends()
    for k, v in result["backends"].items():
        print(f"  {k:20s} {v}", flush=True)
    per: dict[str, dict[str, Any]] = {}
    parts = PARTS / result["mode"]
    for v in VARIANTS:
        part = parts / f"{v}.json"
        done = json.loads(part.read_text()) if resume and part.is_file() else None
        if done is not None and done.get("settings") == result["settings"]:
            per[v] = done["result"]
            print(f"  {v}: kept from {part} (measured {done['when']})", flush=True)
            continue
        print(f"training {v} ...", flush=True)
        per[v] = _spawn(["--child-train", v, *flags])
        print(f"  {v}: {per[v]}", flush=True)
        parts.mkdir(parents=True, exist_ok=True)
        record = {
            "settings": result["settings"],
            "when": time.strftime("%Y-%m-%d %H:%M"),
            "result": per[v],
        }
        atomic_write_text(part, json.dumps(record, indent=1))
    result["variants_measured"] = {
        v: json.loads((parts / f"{v}.json").read_text())["when"] for v in VARIANTS
    }
    weights_only = {v: _spawn(["--child-weights", v]) for v in WEIGHTS_ONLY}
    for key in ("weights_mb", "peak_train_mem_mb", "peak_rss_mb", "acc", "train_s"):
        result[key] = {v: per[v][key] for v in VARIANTS}
    result["weights_mb"].update({v: w["weights_mb"] for v, w in weights_only.items()})
    result["loss"] = {v: [per[v]["loss_first10"], per[v]["loss_last10"]] for v in VARIANTS}
    print("timing (interleaved) ...", flush=True)
    timed = _spawn(["--child-time", *flags])
    result["step_s"] = timed["step_s"]
    result["ratio_vs_peft_4bit"] = timed["ratio_vs_peft_4bit"]
    fp = per["fp32"]
    result["targets"] = {
        "weights_4bit_over_fp32": per["4bit"]["weights_mb"] / fp["weights_mb"],
        "weights_4bit_emb_over_fp32": weights_only["4bit+emb"]["weights_mb"] / fp["weights_mb"],
        "peak_train_mem_4bit_over_fp32": per["4bit"]["peak_train_mem_mb"] / fp["peak_train_mem_mb"],
        "peak_rss_4bit_over_fp32": per["4bit"]["peak_rss_mb"] / fp["peak_rss_mb"],
        "acc_4bit_minus_fp32": per["4bit"]["acc"] - fp["acc"],
        "step_4bit_over_peft_4bit": timed["ratio_vs_peft_4bit"]["4bit"],
    }
    print(json.dumps(result["targets"], indent=1))
    emit(result, out or OUT)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="slimtune bench qbase", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer steps and test examples")
    p.add_argument("--out", default=None, help=f"JSON output (default {OUT})")
    p.add_argument(
        "--no-checkpointing",
        action="store_true",
        help="keep every activation (default: gradient checkpointing, QLoRA's recipe, all variants)",
    )
    p.add_argument(
        "--resume", action="store_true", help="keep variants already measured with these settings"
    )
    p.add_argument("--child-train", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--child-weights", choices=WEIGHTS_ONLY, help=argparse.SUPPRESS)
    p.add_argument("--child-time", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    _quiet()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    ckpt = not a.no_checkpointing
    if a.child_train:
        print(json.dumps(child_train(a.child_train, a.quick, ckpt)))
        return 0
    if a.child_weights:
        print(json.dumps(child_weights(a.child_weights)))
        return 0
    if a.child_time:
        print(json.dumps(child_time(a.quick, ckpt)))
        return 0
    run(a.quick, a.out, ckpt, a.resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())
