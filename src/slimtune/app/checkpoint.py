"""Atomic, pickle-free checkpoints: trainable tensors, optimizer, scheduler and RNG state."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import nn

from ..errors import LoadError
from ..io.files import group_file, write_bytes, write_group

__all__ = ["save_checkpoint", "load_checkpoint", "trainable_state", "STATE_JSON", "STATE_TENSORS"]

STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every trainable tensor, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    extra: dict[str, Any],
    best: dict[str, torch.Tensor] | None,
) -> None:
    """Write ``state.safetensors`` + ``state.json`` into ``path`` (together atomically)."""
    tensors: dict[str, torch.Tensor] = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            tensors["model/" + n] = p.detach().cpu().contiguous()
    for n, t in (best or {}).items():
        tensors["best/" + n] = t.cpu().contiguous()
    opt = optimizer.state_dict()
    for idx, st in opt["state"].items():
        for k, v in st.items():
            tensors[f"opt/{idx}/{k}"] = (
                v.detach().cpu().contiguous() if torch.is_tensor(v) else torch.tensor(v)
            )
    tensors["rng/torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda{i}"] = s
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    meta = {"param_groups": opt["param_groups"], "scheduler": sched, "extra": extra}
    # one group: a crash leaves the previous checkpoint or this one (slimtune.io.files)
    write_group(
        path,
        {
            STATE_TENSORS: lambda tmp: write_bytes(tmp, save(tensors)),
            STATE_JSON: lambda tmp: write_bytes(tmp, json.dumps(meta, indent=1).encode()),
        },
    )


def _check_extra(path: Path, extra: dict[str, Any]) -> None:
    """The loop's counters: integers >= 0 (epoch, step) and finite numbers."""
    for key in ("epoch", "step", "best_epoch"):
        v = extra.get(key)
        low = -1 if key == "best_epoch" else 0
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise LoadError(f"{path}: state.json's {key} must be an integer >= {low}, got {v!r}")
    for key in ("train_s", "best_val"):
        v = extra.get(key)
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise LoadError(f"{path}: state.json's {key} must be a finite number, got {v!r}")


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """Restore what :func:`save_checkpoint` wrote; returns (extra, best state)."""
    try:
        tensors = load_file(str(group_file(path, STATE_TENSORS)))
        meta = json.loads(group_file(path, STATE_JSON).read_text())
    except Exception as exc:  # noqa: BLE001 - any read error means an unusable checkpoint
        raise LoadError(f"{path}: cannot read checkpoint ({exc})") from exc
    if not isinstance(meta, dict) or not all(
        isinstance(meta.get(k), t)
        for k, t in (("param_groups", list), ("scheduler", dict), ("extra", dict))
    ):
        raise LoadError(
            f"{path}: state.json must hold param_groups, scheduler and extra (a damaged checkpoint)"
        )
    _check_extra(path, meta["extra"])
    params = dict(model.named_parameters())
    saved = {k[len("model/") :]: t for k, t in tensors.items() if k.startswith("model/")}
    trainable = {n for n, p in params.items() if p.requires_grad}
    if set(saved) != trainable:
        gone, extra = sorted(trainable - set(saved)), sorted(set(saved) - trainable)
        raise LoadError(
            f"{path}: the checkpoint's tensors are not this model's trainable ones "
            f"(missing {gone[:3]}{'...' if len(gone) > 3 else ''}, "
            f"unknown {extra[:3]}{'...' if len(extra) > 3 else ''}): another run's checkpoint?"
        )
    for name, t in saved.items():
        if t.shape != params[name].shape or not t.is_floating_point():
            raise LoadError(
                f"{path}: checkpoint tensor {name!r} is {t.dtype} {list(t.shape)}, the model's "
                f"is {params[name].dtype} {list(params[name].shape)}"
            )
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if key.startswith("opt/"):
            _, idx, k = key.split("/", 2)
            state.setdefault(int(idx), {})[k] = t
    try:
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        # Plain-function lambdas are not state: torch stores them as None.
        scheduler.load_state_dict(
            {**meta["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)}
        )
        torch.set_rng_state(tensors["rng/torch"])
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise LoadError(
            f"{path}: the optimizer, scheduler or random state does not fit this run ({exc})"
        ) from exc
    with torch.no_grad():  # the model's tensors last, once everything else fitted
        for name, t in saved.items():
            params[name].copy_(t)
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(tensors) if k.startswith("rng/cuda")]
        if states:
            torch.cuda.set_rng_state_all(states)
    best = {k[len("best/") :]: v for k, v in tensors.items() if k.startswith("best/")} or None
    return meta["extra"], best
