"""Operations on run directories: evaluate, export, describe (all through
:func:`~slimtune.app.rebuild.rebuild`), and the demo."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, cast

from torch import nn

from .. import core
from ..export import export_peft, merged_state_dict
from ..io import atomic_write, atomic_write_text, save_pruned
from ..passes.base_pruning import pruning_of
from ..qbase import dequantize_base
from .rebuild import rebuild

__all__ = ["evaluate_run", "export_run", "describe", "describe_task", "run_demo"]


def evaluate_run(run: Path, split: str = "test", *, check_base: bool = True) -> dict[str, Any]:
    """Metrics of a finished run's model (:func:`~slimtune.app.rebuild.rebuild`) on a split."""
    rebuilt = rebuild(run, check_base=check_base)
    metrics = rebuilt.evaluate(split)
    return {"run": str(run), "split": split, **metrics}


def export_run(run: Path, fmt: str, out: Path, *, check_base: bool = True) -> Path:
    """Export a run as peft LoRA (``peft``) or as the merged base model (``merged``; a pruned
    run's merged model is a pruned-backbone folder, :func:`slimtune.io.load_pruned`)."""
    if fmt not in ("peft", "merged"):
        raise ValueError(f"--format must be 'peft' or 'merged', got {fmt!r}")
    if out.exists() and not out.is_dir():
        from ..errors import ExportError

        raise ExportError(f"--out {out}: a file is there; an export is a folder")
    rebuilt = rebuild(run, check_base=check_base)
    model = rebuilt.model
    if fmt == "peft":
        export_peft(model, out)
        _portable_base(out, rebuilt)
        _tokenizer(out, rebuilt)
        return out
    state = merged_state_dict(model)
    base = core.remove(model)
    dequantize_base(base)  # a run on a quantized base exports float weights (the merged ones)
    base.load_state_dict(state)
    _label_names(base, rebuilt)
    out.mkdir(parents=True, exist_ok=True)
    if pruning_of(base) is not None:
        # blocks of different sizes: no transformers config can say so; slimtune's own
        # pruned-backbone folder (model.safetensors + pruned.json, slimtune.io.load_pruned)
        save_pruned(base, out, meta={"model": rebuilt.config.model, "merged": True})
        _tokenizer(out, rebuilt)
        return out
    if hasattr(base, "save_pretrained"):
        cast(Any, base).save_pretrained(out)  # has save_pretrained (checked above)
    else:
        from safetensors.torch import save_file

        atomic_write(out / "model.safetensors", lambda tmp: save_file(state, tmp))
    _tokenizer(out, rebuilt)
    return out


def _portable_base(out: Path, rebuilt: Any) -> None:
    """The peft export names its base as the run did: a built-in model's Hugging Face id (its
    weights are the hub's), or the folder or id of the run config, not this machine's cache."""
    info, cfg = rebuilt.info, rebuilt.config
    name = info.get("hub_id") or getattr(cfg, "model", None)
    if not name:
        return
    path = out / "adapter_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = str(name)
    atomic_write_text(path, json.dumps(config, indent=1))


def _tokenizer(out: Path, rebuilt: Any) -> None:
    """Save the run's tokenizer files beside an export (text models)."""
    source = rebuilt.info.get("tokenizer")
    if not source:
        return
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(source).save_pretrained(out)


def _label_names(model: nn.Module, rebuilt: Any) -> None:
    """Name the classes in a Hugging Face config (``id2label``) for a classification run."""
    config = getattr(model, "config", None)
    if config is None or rebuilt.config.objective != "classify":
        return
    from .build import load_data

    names = load_data(rebuilt.config, rebuilt.info).class_names
    config.id2label = dict(enumerate(names))
    config.label2id = {n: i for i, n in enumerate(names)}


def describe_task(path: Path) -> str:
    """Bytes per part, bits per tensor and the pruning of a saved adapter (task file)."""
    from safetensors.torch import load_file

    from ..io import MANIFEST, WEIGHTS
    from ..io.files import group_file
    from ..io.task import read_pruning
    from .report import task_lines, task_summary

    task = task_summary(path)
    lines = [f"task file {path}: {task['bytes']:,} bytes", ""]
    lines += [line for line in task_lines(task)[2:] if not line.startswith("![")]
    manifest = json.loads(group_file(path, MANIFEST).read_text(encoding="utf-8"))
    pruning = read_pruning(manifest, load_file(str(group_file(path, WEIGHTS))), path)
    if pruning is not None:
        lines += ["pruned from the original base (kept / original):", ""]
        lines += ["| block | heads | FFN neurons |", "|---|---:|---:|"]
        lines += [
            f"| {b} | {len(pruning.heads[b])} / {h} | {len(pruning.neurons[b])} / {f} |"
            for b, (h, f) in pruning.before.items()
        ]
        if pruning.bias_shift:
            lines += ["", f"compensation shifts on {len(pruning.bias_shift)} linears"]
    return "\n".join(lines)


def describe(target: str, *, check_base: bool = True) -> str:
    """Text description of a model name, a run directory or a saved adapter (task file)."""
    from ..io import MANIFEST

    path = Path(target)
    if (path / "config.yaml").is_file():
        rebuilt = rebuild(path, check_base=check_base)
        parts = [rebuilt.title, str(core.summary(rebuilt.model))]
        if (path / "adapter" / MANIFEST).is_file():
            parts += ["", describe_task(path / "adapter")]
        return "\n".join(parts)
    if (path / MANIFEST).is_file():
        return describe_task(path)
    from .build import build_model

    model, info = build_model(target, 2)
    fam = core.family_of(model)
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

    from .config import load_config
    from .loop import train

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
