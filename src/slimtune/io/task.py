"""The pruning part of a task file: which heads and neurons the original base keeps, as bits.

An adapter directory saved from a pruned model (:mod:`slimtune.passes.base_pruning`) is a
*task file*: everything that turns the original base into the task model. Its manifest gets a
``pruned`` section and its weights file two tensors::

    "pruned": {"version": 1, "base": {<fingerprint of the original base>}, "family": "vit",
               "blocks": {"name": "encoder.layer.{}", "each": [0, 1, ...]},
               "sizes": [[heads, ffn], ...], "shift": ["encoder.layer.0.output.dense", ...]}
    pruned/keep   uint8: per block, one bit per original head then one per original neuron
                  (1 = kept), all blocks back to back, the last byte zero-padded
    pruned/shift  float32 [len(shift), out]: compensation's bias shifts (only when compensated;
                  full precision, see slimtune.passes.base_pruning.SHIFT_DTYPE)

A 12-block model of 1,536 FFN neurons keeps its decision in 2.3 KB. Both files are covered by the
adapter's digests (:mod:`slimtune.io.digests`), and the section is checked on reading: sizes,
bit count, padding, a block that keeps nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import LoadError
from ..passes.base_pruning import SHIFT_DTYPE, BasePruning
from .manifest import _index_templates

__all__ = ["KEEP", "PRUNED_KEY", "SHIFT", "pruning_entry", "read_pruning"]

PRUNED_KEY = "pruned"
KEEP = "pruned/keep"
SHIFT = "pruned/shift"
VERSION = 1


def _compact(names: list[str]) -> Any:
    """``{"name": template, "each": [...]}`` when the names differ in one integer, else the list."""
    if len(names) > 1:
        for template, _ in _index_templates(names[0]):
            each = []
            for n in names:
                hit = [i for t, i in _index_templates(n) if t == template]
                if not hit:
                    break
                each.append(hit[0])
            else:
                if [template.replace("{}", str(i)) for i in each] == names:
                    return {"name": template, "each": each}
    return list(names)


def _expand(blocks: Any) -> list[str]:
    if isinstance(blocks, dict) and isinstance(blocks.get("name"), str):
        return [blocks["name"].replace("{}", str(int(i))) for i in blocks.get("each", [])]
    if isinstance(blocks, list) and all(isinstance(b, str) for b in blocks):
        return list(blocks)
    raise ValueError(f"blocks must be a list of names or a template, got {blocks!r}")


def pruning_entry(rec: BasePruning) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The manifest section and the tensors of a pruning record."""
    bits: list[bool] = []
    for b, (h, f) in rec.before.items():
        heads, neurons = set(rec.heads[b]), set(rec.neurons[b])
        bits += [i in heads for i in range(h)] + [i in neurons for i in range(f)]
    flags = torch.tensor(bits + [False] * (-len(bits) % 8), dtype=torch.uint8).reshape(-1, 8)
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)
    tensors = {KEEP: (flags * weights).sum(1).to(torch.uint8)}
    shift = list(rec.bias_shift)
    if shift:
        tensors[SHIFT] = torch.stack([rec.bias_shift[n].reshape(-1) for n in shift]).to(SHIFT_DTYPE)
    entry = {
        "version": VERSION,
        "base": rec.base,
        "family": rec.family,
        "blocks": _compact(list(rec.before)),
        "sizes": [list(v) for v in rec.before.values()],
        "shift": shift,
    }
    return entry, tensors


def read_pruning(
    manifest: dict[str, Any], tensors: dict[str, Tensor], path: Path
) -> BasePruning | None:
    """The pruning record of a task file (its tensors popped from ``tensors``), or ``None``.

    Raises:
        LoadError: a malformed section or tensors that disagree with it.
    """
    keep, shift = tensors.pop(KEEP, None), tensors.pop(SHIFT, None)
    entry = manifest.get(PRUNED_KEY)
    if entry is None:
        if keep is not None or shift is not None:
            raise LoadError(f"{path}: pruning tensors without a 'pruned' section in the manifest")
        return None
    where = f"{path}: the manifest's 'pruned' section"
    try:
        if int(entry["version"]) > VERSION:
            raise LoadError(
                f"{where} has version {entry['version']}; this slimtune reads {VERSION}"
            )
        names = _expand(entry["blocks"])
        sizes = [(int(h), int(f)) for h, f in entry["sizes"]]
        shift_names = [str(n) for n in entry.get("shift", [])]
        base, family = dict(entry["base"]), str(entry["family"])
    except (KeyError, TypeError, ValueError) as exc:
        raise LoadError(f"{where} is malformed ({exc})") from exc
    if len(names) != len(sizes) or any(h < 1 or f < 1 for h, f in sizes):
        raise LoadError(f"{where}: {len(names)} blocks with sizes {sizes}")
    total = sum(h + f for h, f in sizes)
    if (
        keep is None
        or keep.dtype != torch.uint8
        or keep.dim() != 1
        or keep.numel() != -(-total // 8)
    ):
        raise LoadError(
            f"{path}: {KEEP!r} must be {-(-total // 8)} uint8 bytes for {total} heads and neurons"
        )
    bits = ((keep.reshape(-1, 1) >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1).bool()
    if bits[total:].any():
        raise LoadError(f"{path}: {KEEP!r} has bits set past its {total} heads and neurons")
    heads: dict[str, list[int]] = {}
    neurons: dict[str, list[int]] = {}
    at = 0
    for name, (h, f) in zip(names, sizes, strict=True):
        heads[name] = torch.nonzero(bits[at : at + h]).reshape(-1).tolist()
        neurons[name] = torch.nonzero(bits[at + h : at + h + f]).reshape(-1).tolist()
        at += h + f
        if not heads[name] or not neurons[name]:
            raise LoadError(f"{path}: block {name} keeps no head or no FFN neuron")
    shifts: dict[str, Tensor] = {}
    if shift_names:
        if shift is None or shift.dim() != 2 or shift.shape[0] != len(shift_names):
            raise LoadError(f"{path}: {SHIFT!r} must hold one row per shifted linear {shift_names}")
        if not shift.is_floating_point() or not bool(torch.isfinite(shift).all()):
            raise LoadError(f"{path}: {SHIFT!r} must hold finite floating-point values")
        shifts = {n: shift[i].to(SHIFT_DTYPE) for i, n in enumerate(shift_names)}
    elif shift is not None:
        raise LoadError(f"{path}: {SHIFT!r} present but no linear is named in 'shift'")
    return BasePruning(
        base=base,
        family=family,
        before=dict(zip(names, sizes, strict=True)),
        heads=heads,
        neurons=neurons,
        bias_shift=shifts,
    )
