"""Atomic, pickle-free checkpoints: trainable tensors, optimizer, scheduler and RNG state."""

from __future__ import annotations

import json
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


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """Restore what :func:`save_checkpoint` wrote; returns (extra, best state)."""
    try:
        tensors = load_file(str(group_file(path, STATE_TENSORS)))
        meta = json.loads(group_file(path, STATE_JSON).read_text())
    except Exception as exc:  # noqa: BLE001 - any read error means an unusable checkpoint
        raise LoadError(f"{path}: cannot read checkpoint ({exc})") from exc
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, t in tensors.items():
            if key.startswith("model/"):
                name = key[len("model/") :]
                if name not in params:
                    raise LoadError(
                        f"{path}: checkpoint tensor {name!r} does not exist in this model"
                    )
                params[name].copy_(t)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if key.startswith("opt/"):
            _, idx, k = key.split("/", 2)
            state.setdefault(int(idx), {})[k] = t
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    # Plain-function lambdas are not state: torch stores them as None.
    scheduler.load_state_dict(
        {**meta["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)}
    )
    torch.set_rng_state(tensors["rng/torch"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(tensors) if k.startswith("rng/cuda")]
        if states:
            torch.cuda.set_rng_state_all(states)
    best = {k[len("best/") :]: v for k, v in tensors.items() if k.startswith("best/")} or None
    return meta["extra"], best
