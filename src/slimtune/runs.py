"""Operations on run directories: evaluate, export, describe, and the demo."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from . import core
from .export import export_peft, merged_state_dict
from .io import atomic_write, load

__all__ = ["load_run", "evaluate_run", "export_run", "describe", "run_demo"]


def load_run(run: Path) -> tuple[nn.Module, Any, Any]:
    """Rebuild a finished run's model with its saved adapter; returns (model, data, config)."""
    from .train.build import build_run
    from .train.config import load_config

    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"{run}: not a run directory (no config.yaml)")
    if not (run / "adapter").is_dir():
        raise FileNotFoundError(f"{run}: the run has no saved adapter (did it finish?)")
    cfg = load_config(run / "config.yaml", saved=True)
    built = build_run(cfg, apply_methods=False)
    torch.manual_seed(cfg.train.seed)
    model = load(built.model, run / "adapter", check_base=False)
    return model, built.data, cfg


def evaluate_run(run: Path, split: str = "test") -> dict[str, Any]:
    """Accuracy and loss of a run's adapter on a split."""
    from contextlib import nullcontext

    from .train.loop import evaluate

    model, data, cfg = load_run(run)
    dataset = {"train": data.train, "val": data.val, "test": data.test}[split]
    metrics = evaluate(
        model, dataset, data.collate, cfg.train.eval_batch_size, torch.device("cpu"), nullcontext
    )
    return {"run": str(run), "split": split, **metrics}


def export_run(run: Path, fmt: str, out: Path) -> Path:
    """Export a run as peft LoRA (``peft``) or as the merged base model (``merged``)."""
    model, _, _ = load_run(run)
    if fmt == "peft":
        return export_peft(model, out)
    if fmt != "merged":
        raise ValueError(f"--format must be 'peft' or 'merged', got {fmt!r}")
    state = merged_state_dict(model)
    base = core.remove(model)
    base.load_state_dict(state)
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(base, "save_pretrained"):
        cast(Any, base).save_pretrained(out)  # has save_pretrained (checked above)
    else:
        from safetensors.torch import save_file

        atomic_write(out / "model.safetensors", lambda tmp: save_file(state, tmp))
    return out


def describe(target: str) -> str:
    """Text description of a model name or a run directory."""
    path = Path(target)
    if (path / "config.yaml").is_file() and (path / "adapter").is_dir():
        model, _, cfg = load_run(path)
        lines = [f"run {path}: {cfg.model} / {cfg.task}", str(core.summary(model))]
        return "\n".join(lines)
    from .families import detect_family
    from .train.build import build_model

    model, info = build_model(target, 2)
    fam = detect_family(model)
    lines = [
        f"model {target}: {sum(p.numel() for p in model.parameters()):,} parameters, family {fam.name}",
        "",
    ]
    lines.append("roles:")
    for role in sorted(fam.roles):
        names = fam.role_names(model, role)
        if names:
            example = re.sub(r"\.\d+\.", ".N.", names[0])
            lines.append(f"  {role:<8} {len(names):>3} x {example}")
    lines.append("")
    lines.append("modules:")
    seen: list[str] = []
    for n, m in model.named_modules():
        k = re.sub(r"\.\d+(\.|$)", r".N\1", n)
        if n and k not in seen:
            seen.append(k)
            lines.append(f"  {k} ({type(m).__name__})")
    return "\n".join(lines)


def run_demo(out: Path, config: Path | None = None) -> list[dict[str, Any]]:
    """Run the demo config for each of its variants and print a comparison table.

    A variant is ``{name, methods, overrides}``; ``overrides`` maps dotted config keys to values
    (``{train.lr: 0.01}``) applied on top of the config for that variant only.
    """
    import yaml

    from .train.config import load_config
    from .train.loop import train

    config = config or _demo_config()
    raw = yaml.safe_load(config.read_text())
    variants: list[dict[str, Any]] = raw.pop(
        "compare", [{"name": raw.get("name", "run"), "methods": raw.get("methods")}]
    )
    rows = []
    t0 = time.perf_counter()
    for v in variants:
        overrides = [f"name={v['name']}", "methods=" + json.dumps(v["methods"])]
        overrides += [f"{k}={json.dumps(x)}" for k, x in v.get("overrides", {}).items()]
        cfg = load_config(config, overrides)
        print(f"== {v['name']}: {cfg.model} / {cfg.task}", flush=True)
        rows.append(train(cfg, out / v["name"]))
    print()
    print(
        f"{'method':<12} {'trainable':>10} {'% base':>8} {'val acc':>8} {'test acc':>9} {'train s':>8}"
    )
    for r in rows:
        print(
            f"{r['name']:<12} {r['trainable_params']:>10,} {r['trainable_pct']:>7.3f}% "
            f"{r['val']['accuracy']:>8.4f} {r['test']['accuracy']:>9.4f} {r['train_s']:>8.1f}"
        )
    print(f"\nreports: {out}/<method>/report.md   (total {time.perf_counter() - t0:.0f} s)")
    return rows


def _demo_config() -> Path:
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        p = base / "configs" / "demo.yaml"
        if p.is_file():
            return p
    raise FileNotFoundError("configs/demo.yaml not found (run from the repository root)")
