"""The adapter manifest (``slimtune.json``), format 3: tensor groups and their description.

Tensors that differ only in their block index and share method, shape, dtype and precision are
described once, by a name template and the indices::

    {"name": "encoder.layer.{}.mlp.down.weight", "each": [0, 1, ..., 11], "method": "adapter",
     "shape": [32, 384], "dtype": "float32", "bits": 1, "criterion": "l1"}

(the plan's entries are grouped the same way, see :meth:`slimtune.plan.Plan.to_dict`). The
safetensors file holds the plan's index tensors (``plan/...``); each group of float tensors as
one stacked tensor named by its template (``[len(each), *shape]``; a tensor of no group by its
own name); and, for quantized matrices, two shared tensors: ``quant/codes`` (uint8, every
matrix's bit-packed codes back to back, each starting on a byte) and ``quant/scales`` (float32,
one ``(mu, sigma)`` row per matrix), both in the manifest's order. Where a matrix's codes and
scale row are follows from the shapes and bit widths before it, so nothing per matrix is stored
but its bits: a 1-bit adapter costs its bits, 8 bytes per matrix and a few hundred bytes of
manifest and header. :func:`tensor_descriptions` gives the per-tensor view of any format
(older ones: :mod:`slimtune.io.legacy`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from ..errors import LoadError, PlanError
from ..plan import SLOT, fill, is_index
from ..quant import QuantSpec
from .legacy import describe_v2

__all__ = [
    "MANIFEST",
    "WEIGHTS",
    "FORMAT",
    "FORMAT_VERSION",
    "CODES",
    "SCALES",
    "tensor_descriptions",
]


MANIFEST = "slimtune.json"


WEIGHTS = "adapter.safetensors"


FORMAT = "slimtune-adapter"


FORMAT_VERSION = 3


CODES = "quant/codes"


SCALES = "quant/scales"


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out: dict[str, str] = {"torch": str(torch.__version__)}
    for pkg in ("slimtune", "transformers", "safetensors"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


def _index_templates(name: str) -> list[tuple[str, int]]:
    """``(template, i)`` for every integer in ``name`` (``a.3.b`` -> ``("a.{}.b", 3)``)."""
    if SLOT in name:
        return []
    return [
        (name[: m.start()] + SLOT + name[m.end() :], int(m.group()))
        for m in re.finditer(r"\d+", name)
        if is_index(m.group())
    ]


def group_tensors(
    infos: dict[str, dict[str, Any]], reserved: set[str]
) -> list[tuple[dict[str, Any], list[str]]]:
    """Manifest entries for tensors ``infos`` (name -> description) and the names in each.

    Tensors with equal descriptions whose names differ in one integer form one entry
    ``{"name": template, "each": [i, ...], **description}``; of the integers in a name, the one
    shared by the most such tensors is used. Every other tensor is an entry of its own. A float
    group's template names its stacked tensor in the weights file, so a template that would
    clash with another stored name (or one in ``reserved``) is not used.
    """
    attrs = {n: json.dumps(info, sort_keys=True) for n, info in infos.items()}
    cands = {n: _index_templates(n) for n in infos}
    chosen: dict[str, tuple[str, int]] = {}
    left = list(infos)
    while left:  # the largest group first, then again among the tensors left
        count = Counter((t, attrs[n]) for n in left for t, _ in cands[n])
        best = max(count, key=lambda k: count[k], default=None)
        if best is None or count[best] < 2:
            break
        for n in left:
            for t, i in cands[n]:
                if (t, attrs[n]) == best:
                    chosen[n] = (t, i)
        left = [n for n in left if n not in chosen]
    members: dict[tuple[str, str, str], list[tuple[str, int]]] = {}
    for n in infos:
        t, i = chosen.get(n, (n, -1))
        members.setdefault((t, attrs[n], "" if n in chosen else n), []).append((n, i))
    keys = Counter(t for (t, _, _), m in members.items() if "bits" not in infos[m[0][0]])
    out: list[tuple[dict[str, Any], list[str]]] = []
    for (template, _, _), group in members.items():
        info = infos[group[0][0]]
        clash = "bits" not in info and (keys[template] > 1 or template in reserved)
        if len(group) > 1 and not clash:
            entry = {"name": template, "each": [i for _, i in group], **info}
            out.append((entry, [n for n, _ in group]))
        else:
            out += [({"name": n, **infos[n]}, [n]) for n, _ in group]
    stored = [e["name"] for e, _ in out if "bits" not in e]
    if len(set(stored)) != len(stored) or set(stored) & reserved:
        raise ValueError(f"cannot save: a tensor name clashes with one of {sorted(reserved)}")
    return out


def manifest_text(manifest: dict[str, Any]) -> str:
    """Compact JSON, one top-level key (and one tensor entry) per line.

    With many small quantized matrices, indentation would cost more than the 1-bit weights of
    a small adapter (``python -m json.tool`` pretty-prints it)."""

    def dump(v: Any) -> str:
        return json.dumps(v, separators=(",", ":"))

    lines = []
    for k, v in manifest.items():
        if isinstance(v, list) and v:
            v_text = "[\n" + ",\n".join(dump(x) for x in v) + "\n]"
        else:
            v_text = dump(v)
        lines.append(f"{dump(k)}:{v_text}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def describe_tensors(manifest: dict[str, Any], mpath: Path) -> dict[str, dict[str, Any]]:
    """Per-tensor descriptions of a manifest of any format version.

    Format 3's entries are expanded; a quantized matrix gets its derived byte range ``"codes":
    [offset, nbytes]`` and ``"scale": row``, a float tensor ``"stored": [key, index]`` (index
    ``None`` for a tensor stored alone) and ``"stored_shape"``.
    """
    raw = manifest.get("tensors", {})
    if int(manifest.get("format_version", 0)) < 3:
        return describe_v2(raw, mpath)
    if not isinstance(raw, list):
        raise LoadError(f"{mpath}: 'tensors' must be a list of tensor entries")
    out: dict[str, dict[str, Any]] = {}
    offset = row = 0
    for k, entry in enumerate(raw):
        where = f"{mpath}: tensor entry {k}"
        if not isinstance(entry, dict):
            raise LoadError(f"{where} must be an object, got {entry!r}")
        name, each, shape = entry.get("name"), entry.get("each"), entry.get("shape")
        if not isinstance(name, str) or not isinstance(entry.get("method"), str):
            raise LoadError(f"{where} needs a 'name' and a 'method' (strings)")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise LoadError(f"{where} ({name!r}): 'shape' must be a list of sizes, got {shape!r}")
        if each is not None and (
            name.count(SLOT) != 1
            or not isinstance(each, list)
            or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in each)
        ):
            raise LoadError(
                f"{where} ({name!r}): 'each' needs a name with one {SLOT!r} and a list of "
                f"indices, got {each!r}"
            )
        bits = entry.get("bits")
        if bits is not None:
            try:
                QuantSpec(int(bits), str(entry.get("criterion", "l1")))
            except (PlanError, TypeError, ValueError) as exc:
                raise LoadError(f"{where} ({name!r}): {exc}") from exc
        names = [name] if each is None else [fill(name, i) for i in each]
        info = {key: v for key, v in entry.items() if key not in ("name", "each")}
        numel = math.prod(shape)
        for i, n in enumerate(names):
            if n in out:
                raise LoadError(f"{mpath}: tensor {n!r} is described twice")
            if bits is not None:
                nbytes = -(-numel * int(bits) // 8)
                out[n] = {**info, "codes": [offset, nbytes], "scale": row}
                offset, row = offset + nbytes, row + 1
            else:
                stored_shape = shape if each is None else [len(each), *shape]
                out[n] = {
                    **info,
                    "stored": [name, None if each is None else i],
                    "stored_shape": stored_shape,
                }
    return out


def tensor_descriptions(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """Tensor name -> description (``shape``, ``dtype``, ``method``; ``bits`` and
    ``criterion`` for quantized matrices, where their codes are) of the adapter saved in
    ``path``, for any format version (reads only the manifest)."""
    from .files import group_file

    mpath = group_file(path, MANIFEST)
    return describe_tensors(read_manifest(mpath), Path(path) / MANIFEST)


def read_manifest(mpath: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LoadError(
            f"{mpath}: not valid JSON ({exc}); the file is corrupted or not a slimtune manifest"
        ) from exc
    except RecursionError as exc:
        raise LoadError(f"{mpath}: nested too deeply to be a slimtune manifest") from exc
    except OSError as exc:
        raise LoadError(f"{mpath}: cannot read ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise LoadError(f"{mpath}: not a slimtune adapter manifest (expected format {FORMAT!r})")
    raw = manifest.get("format_version", 0)
    if isinstance(raw, bool) or not isinstance(raw, int | float) or raw != int(min(raw, 1e9)):
        raise LoadError(f"{mpath}: invalid format version {raw!r} (a small integer)")
    version = int(raw)
    for key, kind in (("base", dict), ("plan", dict), ("pruned", dict)):
        if key in manifest and not isinstance(manifest[key], kind):
            raise LoadError(
                f"{mpath}: {key!r} must be a JSON {'object' if kind is dict else 'array'}, "
                f"got {type(manifest[key]).__name__}"
            )
    if version > FORMAT_VERSION:
        raise LoadError(
            f"{mpath}: format version {version} is newer than supported ({FORMAT_VERSION})"
        )
    return manifest
