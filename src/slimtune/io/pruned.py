"""Pruned backbones on disk: ``model.safetensors`` + ``pruned.json`` (the kept size of each block).

Blocks may keep different numbers of heads and neurons. ``transformers`` cannot express that in
a ``config.json`` (BERT derives the head size from ``hidden_size / num_attention_heads``), so a
pruned backbone is stored in its own small format by :func:`save_pruned`: every tensor of the
pruned model (nothing pickled) and the sizes. :func:`load_pruned` shrinks a freshly built,
unpruned model of the same architecture to those sizes (:func:`slimtune.passes.shrink.shrink`)
and loads the tensors into it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..core import family_of
from ..errors import LoadError, PlanError
from ..families import Family
from ..methods.base import Wrapper
from ..passes.blocks import block_infos, layer_params
from ..passes.shrink import shrink
from ..qbase.layers import load_quantized_state
from .files import atomic_write, atomic_write_text

__all__ = [
    "PRUNED_MANIFEST",
    "PRUNED_WEIGHTS",
    "FORMAT",
    "FORMAT_VERSION",
    "base_state_dict",
    "save_pruned",
    "load_pruned",
]


PRUNED_MANIFEST = "pruned.json"


PRUNED_WEIGHTS = "model.safetensors"


FORMAT = "slimtune-pruned"


FORMAT_VERSION = 1


def base_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's own tensors under their original names: wrapper parameters left out."""
    wrapper_params: set[str] = set()
    for mname, module in model.named_modules():
        if isinstance(module, Wrapper):
            for pname, _ in module.named_parameters(recurse=False):
                wrapper_params.add(f"{mname}.{pname}")
            for cname, child in module.named_children():
                if cname != "base_layer":
                    for pname, _ in child.named_parameters():
                        wrapper_params.add(f"{mname}.{cname}.{pname}")
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        if key in wrapper_params:
            continue
        out[key.replace(".base_layer.", ".")] = value
    return out


def _sizes(model: nn.Module, family: Family) -> list[dict[str, Any]]:
    return [
        {
            "name": b.name,
            "heads": b.num_heads,
            "kv_heads": b.kv_heads,
            "head_dim": b.head_dim,
            "ffn": b.ffn,
        }
        for b in block_infos(model, family)
    ]


def _kept_heads(saved: Mapping[str, Any], block: Any) -> list[int]:
    """Query heads to keep in a fresh block so it takes the saved shapes: the first
    ``heads / kv_heads`` query heads of each of the first ``kv_heads`` key/value groups."""
    heads = int(saved["heads"])
    kv = int(saved.get("kv_heads", heads))
    if kv < 1 or heads % kv:
        raise LoadError(f"{saved['name']}: {heads} heads do not split into {kv} key/value groups")
    per = heads // kv
    return [g * block.group_size + j for g in range(kv) for j in range(per)]


def save_pruned(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    family: Family | None = None,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Save a pruned backbone as ``model.safetensors`` + ``pruned.json`` in directory ``path``.

    Wrappers (LoRA) are left out; the saved model is the pruned base with its head.
    """
    family = family or family_of(model)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu().clone() for k, v in base_state_dict(model).items()}
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "family": family.name,
        "blocks": _sizes(model, family),
        "layer_params": layer_params(model, family),
        "meta": dict(meta or {}),
    }
    atomic_write(
        out / PRUNED_WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT})
    )
    atomic_write_text(out / PRUNED_MANIFEST, json.dumps(manifest, indent=1))
    return out


def load_pruned(
    model: nn.Module, path: str | os.PathLike[str], *, family: Family | None = None
) -> nn.Module:
    """Shrink a fresh, unpruned ``model`` of the same architecture to the saved sizes and load it.

    Args:
        model: a plain model built like the one that was pruned (its weights are replaced).
        path: a directory written by :func:`save_pruned`.

    Raises:
        LoadError: missing or foreign files, another architecture, or tensors that do not fit.
    """
    path = Path(path)
    mpath, wpath = path / PRUNED_MANIFEST, path / PRUNED_WEIGHTS
    for f in (mpath, wpath):
        if not f.is_file():
            raise LoadError(
                f"{f}: missing (a pruned backbone holds {PRUNED_MANIFEST} and {PRUNED_WEIGHTS})"
            )
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
        tensors = load_file(str(wpath))
    except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError, OSError) as exc:
        raise LoadError(f"{path}: cannot read the pruned backbone ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise LoadError(f"{mpath}: not a pruned slimtune backbone (expected format {FORMAT!r})")
    if int(manifest.get("format_version", 0)) > FORMAT_VERSION:
        raise LoadError(f"{mpath}: format version {manifest['format_version']} is too new")
    family = family or family_of(model)
    if family.name != manifest.get("family"):
        raise LoadError(
            f"{path}: saved from a {manifest.get('family')} model, this is {family.name}"
        )
    blocks = {b.name: b for b in block_infos(model, family)}
    saved = manifest["blocks"]
    if [s["name"] for s in saved] != list(blocks):
        raise LoadError(
            f"{path}: saved blocks {[s['name'] for s in saved]} differ from this model's {list(blocks)}"
        )
    try:
        shrink(
            model,
            heads={s["name"]: _kept_heads(s, blocks[s["name"]]) for s in saved},
            neurons={s["name"]: range(int(s["ffn"])) for s in saved},
            family=family,
        )
    except PlanError as exc:
        raise LoadError(f"{path}: the saved sizes do not fit this model ({exc})") from exc
    # Take copies of the loaded tensors (on the model's device, in its dtype) instead of copying
    # into the built ones: the unpruned weights are then released, which matters where they are
    # a memory map of the original checkpoint that the unpruned embeddings would otherwise keep
    # alive (transformers loads safetensors that way). Copies, so that nothing maps the run's
    # file afterwards. Tied parameters are copied into, to keep them tied.
    ptrs = [p.data_ptr() for _, p in model.named_parameters(remove_duplicate=False)]
    assign = len(ptrs) == len(set(ptrs))
    if assign:
        current = model.state_dict()
        tensors = {
            k: v.to(device=current[k].device, dtype=current[k].dtype, copy=True)
            if k in current
            else v
            for k, v in tensors.items()
        }
    try:
        # a quantized base: the saved codes and their quantization state go in as they are
        tensors, done = load_quantized_state(model, tensors)
        missing, unexpected = model.load_state_dict(tensors, strict=False, assign=assign)
        missing = [k for k in missing if k not in done]
        if missing or unexpected:
            raise RuntimeError(f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    except RuntimeError as exc:
        raise LoadError(f"{path}: tensors do not fit this model: {exc}") from exc
    return model
