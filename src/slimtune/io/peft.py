"""Hugging Face peft LoRA adapters into slimtune: :func:`import_peft` (``slimtune.load`` on a
peft folder does the same).

A peft LoRA folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` with
``base_model.model.<module>.lora_A.weight`` ``[r, in]`` and ``lora_B.weight`` ``[out, r]`` per
adapted module and the ``modules_to_save`` (the task head) as plain tensors. peft computes
``base(x) + s * B A dropout(x)`` with ``s = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with
``use_rslora``), per-module ``r`` and ``lora_alpha`` from ``rank_pattern`` / ``alpha_pattern``:
exactly slimtune's LoRA with ``alpha = s * r``. So each adapted module becomes a slimtune LoRA
entry of the same rank, the head a plan head, and the tensors are copied as they are.

What slimtune has no equivalent for is refused by name: other peft types (IA3, LoHa, ...),
DoRA, trained LoRA biases (``bias`` other than ``"none"``), LoRA on embeddings, pickled
``adapter_model.bin`` files.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ..errors import LoadError, PlanError
from ..plan import Plan, PlanEntry
from .attach import apply_and_fill

__all__ = ["import_peft", "is_peft_dir"]

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."


def is_peft_dir(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a peft adapter folder (has ``adapter_config.json``)."""
    return (Path(path) / CONFIG).is_file()


def _pattern(name: str, patterns: dict[str, Any], default: Any) -> Any:
    """peft's rule: the first key ``k`` with ``re.match(rf"(.*\\.)?({k})$", name)``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _refusals(cfg: dict[str, Any], path: Path) -> None:
    kind = cfg.get("peft_type")
    if kind != "LORA":
        raise LoadError(
            f"{path}: peft type {kind!r} has no slimtune equivalent (only LORA imports)"
        )
    if cfg.get("use_dora"):
        raise LoadError(f"{path}: DoRA (use_dora) has no slimtune equivalent")
    if cfg.get("bias", "none") != "none":
        raise LoadError(
            f"{path}: bias={cfg['bias']!r} (trained biases with LoRA) is not imported; "
            "slimtune imports bias='none' adapters"
        )
    for key in ("layer_replication", "trainable_token_indices", "target_parameters"):
        if cfg.get(key):
            raise LoadError(f"{path}: {key} has no slimtune equivalent")


def _read(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    if not (path / WEIGHTS).is_file():
        if (path / "adapter_model.bin").is_file():
            raise LoadError(
                f"{path}: adapter_model.bin is a pickle, which slimtune does not load; save the "
                "adapter with safetensors (peft's default, safe_serialization=True)"
            )
        raise LoadError(f"{path / WEIGHTS}: missing")
    try:
        cfg = json.loads((path / CONFIG).read_text(encoding="utf-8"))
        tensors = load_file(str(path / WEIGHTS))
    except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError, OSError) as exc:
        raise LoadError(f"{path}: cannot read the peft adapter ({exc})") from exc
    if not isinstance(cfg, dict):
        raise LoadError(f"{path / CONFIG}: not a peft adapter config")
    return cfg, tensors


def _split(
    tensors: dict[str, torch.Tensor], path: Path
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """LoRA pairs by module name, and the other (head) tensors by parameter name."""
    lora: dict[str, dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        name = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        if "lora_embedding_" in name or "lora_magnitude_vector" in name:
            raise LoadError(f"{path}: {key}: LoRA on embeddings / DoRA has no slimtune equivalent")
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight", name)
        if m:
            lora.setdefault(m.group(1), {})[m.group(2)] = t
        else:
            rest[name] = t
    for module, pair in lora.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise LoadError(
                f"{path}: {module} has {sorted(pair)} only (LoRA needs lora_A and lora_B)"
            )
    return lora, rest


def _heads(
    model: nn.Module, cfg: dict[str, Any], rest: dict[str, torch.Tensor], path: Path
) -> list[str]:
    """The modules of ``modules_to_save`` that the file holds tensors for."""
    wanted = cfg.get("modules_to_save") or []
    heads: list[str] = []
    for name, _ in model.named_modules():
        wanted_here = bool(name) and any(name == s or name.endswith("." + s) for s in wanted)
        holds = any(k.startswith(name + ".") for k in rest)
        inside = any(name.startswith(h + ".") for h in heads)
        if wanted_here and holds and not inside:
            heads.append(name)
    stray = [k for k in rest if not any(k.startswith(h + ".") for h in heads)]
    if stray:
        raise LoadError(
            f"{path}: tensor {stray[0]!r} is neither LoRA nor part of modules_to_save "
            f"{wanted} ({len(stray)} such tensors)"
        )
    return heads


def import_peft(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Apply a peft LoRA adapter folder to ``model`` as slimtune methods, exactly.

    Args:
        model: the base model the adapter was made for (a fresh one: no slimtune methods).
        path: a folder written by peft's ``save_pretrained`` (or :func:`slimtune.export_peft`).

    Returns:
        ``model`` with slimtune LoRA (per-module rank and scaling as peft's) and the head.

    Raises:
        LoadError: not a LoRA adapter, something without a slimtune equivalent, a module the
            model lacks, or shapes that do not fit. On any error the model is left as it was.
    """
    from ..core import family_of
    from ..linear import dims

    path = Path(path)
    cfg, tensors = _read(path)
    _refusals(cfg, path)
    lora, rest = _split(tensors, path)
    if not lora:
        raise LoadError(f"{path}: no LoRA tensors in {WEIGHTS}")
    modules = dict(model.named_modules())
    entries = []
    for name, pair in sorted(lora.items()):
        if name not in modules:
            raise LoadError(f"{path}: the adapter targets {name!r}, which this model does not have")
        a, b = pair["lora_A"], pair["lora_B"]
        r = int(a.shape[0])
        if b.dim() != 2 or b.shape[1] != r:
            raise LoadError(
                f"{path}: {name}: lora_B {tuple(b.shape)} does not fit lora_A {tuple(a.shape)}"
            )
        want_r = int(_pattern(name, cfg.get("rank_pattern") or {}, cfg.get("r", r)))
        if want_r != r:
            raise LoadError(f"{path}: {name}: rank {r} in the tensors, {want_r} in the config")
        alpha = float(_pattern(name, cfg.get("alpha_pattern") or {}, cfg.get("lora_alpha", r)))
        scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        if a.dim() == 2:  # a linear (Conv2d LoRA is 4-D: its shapes are checked on copy)
            d_in, d_out = dims(modules[name])
            if (a.shape[1], b.shape[0]) != (d_in, d_out):
                raise LoadError(
                    f"{path}: {name}: LoRA maps {a.shape[1]} -> {b.shape[0]}, the layer {d_in} -> {d_out}"
                )
        settings = {"r": r, "alpha": scaling * r, "dropout": float(cfg.get("lora_dropout", 0.0))}
        entries.append(PlanEntry("lora", name, settings))
    heads = _heads(model, cfg, rest, path)
    try:
        family = family_of(model).name
    except PlanError:
        family = "generic"
    plan = Plan(entries=entries, head=heads, family=family, meta={"imported_from": "peft"})

    def fill() -> None:
        with torch.no_grad():
            params = dict(model.named_parameters())
            for name, pair in lora.items():
                for part in ("lora_A", "lora_B"):
                    p = params[f"{name}.{part}"]
                    src = pair[part]
                    if tuple(src.shape) != tuple(p.shape):
                        raise LoadError(
                            f"{path}: {name}.{part} is {tuple(src.shape)}, slimtune's is {tuple(p.shape)}"
                        )
                    p.copy_(src.to(p.dtype))
            for key, t in rest.items():
                if key not in params:
                    raise LoadError(f"{path}: head tensor {key!r} has no place in this model")
                if tuple(params[key].shape) != tuple(t.shape):
                    raise LoadError(
                        f"{path}: {key} is {tuple(t.shape)}, the model's is {tuple(params[key].shape)}"
                    )
                params[key].copy_(t.to(params[key].dtype))

    return apply_and_fill(model, plan, fill, path)
