"""Saving and loading adapters: ``slimtune.json`` (manifest) + ``adapter.safetensors``.

The manifest holds the plan, library versions, the base model's fingerprint and a description
of every saved tensor. Tensors that differ only in their block index and share method, shape,
dtype and precision are described once, by a name template and the indices (format 3)::

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
manifest and header. :func:`tensor_descriptions` gives the per-tensor view of any format.

Files of format version 2 (one manifest entry per tensor with its byte range ``"codes":
[offset, nbytes]`` and ``"scale": row``, float tensors by name) and version 1 (``<name>.codes``
/ ``.mu`` / ``.sigma`` per matrix) still load. Nothing is pickled. Every file is written
atomically (temporary file + rename).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .core import apply_plan, get_state, method_parameters, remove
from .errors import LoadError, PlanError
from .methods.base import QuantizedWeights, Wrapper
from .plan import SLOT, Plan, fill, is_index
from .quant import QuantSpec, decode, encode, pack_codes, unpack_codes

__all__ = [
    "save",
    "load",
    "atomic_write",
    "atomic_write_text",
    "storage_report",
    "tensor_descriptions",
    "MANIFEST",
    "WEIGHTS",
]

MANIFEST = "slimtune.json"
WEIGHTS = "adapter.safetensors"
FORMAT = "slimtune-adapter"
FORMAT_VERSION = 3
CODES = "quant/codes"
SCALES = "quant/scales"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path``.

    The file gets the permissions a plain ``open`` would give it (``0o666`` less the umask),
    not the owner-only mode of temporary files.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write a text file atomically."""

    def _w(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())

    atomic_write(path, _w)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out: dict[str, str] = {"torch": str(torch.__version__)}
    for pkg in ("slimtune", "transformers", "safetensors"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


def _quantized(model: nn.Module) -> dict[str, tuple[QuantSpec, QuantizedWeights, str]]:
    """Names of quantized weight parameters -> (precision, owning wrapper, name inside it)."""
    out: dict[str, tuple[QuantSpec, QuantizedWeights, str]] = {}
    for name, module in model.named_modules():
        spec = getattr(module, "quant", None)
        if isinstance(module, QuantizedWeights) and isinstance(spec, QuantSpec) and spec.bits < 32:
            for pname in module.quantized_params:
                out[f"{name}.{pname}"] = (spec, module, pname)
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


def _group_tensors(
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


def _collect(model: nn.Module) -> tuple[dict[str, Tensor], list[dict[str, Any]]]:
    """Tensors to save and the manifest's tensor entries (see the module docstring)."""
    state = get_state(model)
    owner = method_parameters(model)
    quant = _quantized(model)
    infos: dict[str, dict[str, Any]] = {}
    floats: dict[str, Tensor] = {}
    codes_of: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
    for name, p in model.named_parameters():
        if owner[name] == "base":
            continue
        t = p.detach()
        info: dict[str, Any] = {
            "method": owner[name],
            "shape": list(t.shape),
            "dtype": str(t.dtype).removeprefix("torch."),
        }
        if name in quant:
            spec, module, attr = quant[name]
            stored_codes = module.stored_codes(attr, p)
            codes_of[name] = stored_codes if stored_codes is not None else encode(t, spec)
            info.update(bits=spec.bits, criterion=spec.criterion)
        else:
            floats[name] = t
        infos[name] = info
    tensors: dict[str, Tensor] = {"plan/" + k: t for k, t in state.plan.tensors.items()}
    groups = _group_tensors(infos, reserved={CODES, SCALES, *tensors})
    packed: list[Tensor] = []
    scales: list[Tensor] = []
    for entry, names in groups:
        if "bits" in entry:
            for n in names:
                codes, mu, sigma = codes_of[n]
                packed.append(pack_codes(codes, entry["bits"]).cpu())
                scales.append(torch.stack([mu.reshape(()), sigma.reshape(())]).float().cpu())
        elif "each" in entry:
            tensors[entry["name"]] = torch.stack([floats[n] for n in names])
        else:
            tensors[entry["name"]] = floats[names[0]]
    if packed:
        tensors[CODES] = torch.cat(packed)
        tensors[SCALES] = torch.stack(scales)
    return {k: v.contiguous().cpu() for k, v in tensors.items()}, [e for e, _ in groups]


def _manifest_text(manifest: dict[str, Any]) -> str:
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


def save(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Save the methods applied to ``model`` (not the base) into directory ``path``.

    Writes ``slimtune.json`` and ``adapter.safetensors``; returns the directory.
    """
    state = get_state(model)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    merged = [n for n, m in model.named_modules() if isinstance(m, Wrapper) and m.merged]
    tensors, described = _collect(model)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "versions": _versions(),
        "base": state.fingerprint,
        "plan": state.plan.to_dict(compact=True),
        "added_biases": state.added_biases,
        "merged_when_saved": bool(merged),
        "tensors": described,
    }
    atomic_write(out / WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT}))
    atomic_write_text(out / MANIFEST, _manifest_text(manifest))
    return out


def _describe(manifest: dict[str, Any], mpath: Path) -> dict[str, dict[str, Any]]:
    """Per-tensor descriptions of a manifest of any format version.

    Format 3's entries are expanded; a quantized matrix gets its derived byte range ``"codes":
    [offset, nbytes]`` and ``"scale": row``, a float tensor ``"stored": [key, index]`` (index
    ``None`` for a tensor stored alone) and ``"stored_shape"``.
    """
    raw = manifest.get("tensors", {})
    if int(manifest.get("format_version", 0)) < 3:
        if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
            raise LoadError(f"{mpath}: 'tensors' must map tensor names to descriptions")
        return raw
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
    mpath = Path(path) / MANIFEST
    return _describe(_read_manifest(mpath), mpath)


def _read_manifest(mpath: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LoadError(
            f"{mpath}: not valid JSON ({exc}); the file is corrupted or not a slimtune manifest"
        ) from exc
    except OSError as exc:
        raise LoadError(f"{mpath}: cannot read ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise LoadError(f"{mpath}: not a slimtune adapter manifest (expected format {FORMAT!r})")
    try:
        version = int(manifest.get("format_version", 0))
    except (TypeError, ValueError) as exc:
        raise LoadError(f"{mpath}: invalid format version {manifest['format_version']!r}") from exc
    if version > FORMAT_VERSION:
        raise LoadError(
            f"{mpath}: format version {version} is newer than supported ({FORMAT_VERSION})"
        )
    return manifest


def _read(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    mpath, wpath = path / MANIFEST, path / WEIGHTS
    if not path.is_dir():
        raise LoadError(f"{path}: no such adapter directory")
    for f in (mpath, wpath):
        if not f.is_file():
            raise LoadError(
                f"{f}: missing (a slimtune adapter directory holds {MANIFEST} and {WEIGHTS})"
            )
    manifest = _read_manifest(mpath)
    try:
        tensors = load_file(str(wpath))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise LoadError(
            f"{wpath}: cannot read tensors ({exc}); the file is truncated, corrupted or not safetensors"
        ) from exc
    return manifest, tensors


def _check_base(model: nn.Module, manifest: dict[str, Any], plan: Plan, path: Path) -> None:
    from .core import fingerprint

    want = manifest.get("base", {})
    have = fingerprint(model, exclude=plan.head)
    if want.get("structure") != have["structure"]:
        raise LoadError(
            f"{path}: the adapter was trained on a different architecture "
            f"({want.get('params')} base parameters, structure {want.get('structure')}; this model has "
            f"{have['params']}, structure {have['structure']})"
        )
    if want.get("weights") != have["weights"]:
        raise LoadError(
            f"{path}: the base model's weights differ from the ones the adapter was trained on "
            f"(fingerprint {have['weights']} != {want.get('weights')}); load it onto the same base checkpoint"
        )


def load(model: nn.Module, path: str | os.PathLike[str], *, check_base: bool = True) -> nn.Module:
    """Apply a saved adapter to a fresh base model and restore its tensors exactly.

    Raises:
        LoadError: missing/corrupted/foreign files, a different base model, a missing tensor or
            a shape mismatch. On any error the model is left as it was.
    """
    path = Path(path)
    manifest, tensors = _read(path)
    described = _describe(manifest, path / MANIFEST)
    plan_tensors = {k[len("plan/") :]: v for k, v in tensors.items() if k.startswith("plan/")}
    try:
        plan = Plan.from_dict(manifest["plan"], plan_tensors)
    except (PlanError, KeyError, TypeError) as exc:
        raise LoadError(f"{path / MANIFEST}: invalid plan ({exc})") from exc
    if check_base:
        _check_base(model, manifest, plan, path)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        apply_plan(model, plan)
    except Exception as exc:
        raise LoadError(f"{path}: cannot apply the saved plan to this model ({exc})") from exc
    try:
        _restore(model, described, tensors, path)
    except BaseException:
        remove(model)
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, p.requires_grad))
        raise
    return model


def _restore(
    model: nn.Module, described: dict[str, Any], tensors: dict[str, Tensor], path: Path
) -> None:
    owner = method_parameters(model)
    params = dict(model.named_parameters())
    expected = {n for n, m in owner.items() if m != "base"}
    missing = sorted(expected - set(described))
    if missing:
        raise LoadError(f"{path / MANIFEST}: no tensor for {missing[0]!r} ({len(missing)} missing)")
    extra = sorted(set(described) - set(params))
    if extra:
        raise LoadError(
            f"{path}: tensor {extra[0]!r} has no place in this model ({len(extra)} unknown)"
        )
    _check_precision(model, described, path)
    _check_codes_used(described, tensors, path)
    values: dict[str, Tensor] = {}
    stored: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
    for name, info in described.items():
        p = params[name]
        if list(p.shape) != list(info["shape"]):
            raise LoadError(
                f"{path / WEIGHTS}: tensor {name!r} has shape {info['shape']}, the model expects {list(p.shape)}"
            )
        if "bits" in info:
            try:
                spec = QuantSpec(int(info["bits"]), str(info.get("criterion", "l1")))
            except PlanError as exc:
                raise LoadError(f"{path / MANIFEST}: tensor {name!r}: {exc}") from exc
            codes, mu, sigma = _stored_codes(name, info, spec, p.numel(), tensors, path)
            codes = codes.view(p.shape)
            stored[name] = (codes, mu, sigma)
            values[name] = decode(codes, mu, sigma, spec)
        elif "stored" in info:  # format 3: alone or in its group's stacked tensor
            key, index = info["stored"]
            if key not in tensors:
                raise LoadError(f"{path / WEIGHTS}: missing tensor {key!r}")
            t = tensors[key]
            if list(t.shape) != list(info["stored_shape"]):
                what = "" if index is None else f" ({info['stored_shape'][0]} tensors stacked)"
                raise LoadError(
                    f"{path / WEIGHTS}: tensor {key!r} has shape {list(t.shape)}, the manifest "
                    f"says {info['stored_shape']}{what} and the model expects {list(p.shape)}"
                )
            values[name] = t if index is None else t[index]
        else:
            if name not in tensors:
                raise LoadError(f"{path / WEIGHTS}: missing tensor {name!r}")
            t = tensors[name]
            if list(t.shape) != list(p.shape):
                raise LoadError(
                    f"{path / WEIGHTS}: tensor {name!r} has shape {list(t.shape)}, the model expects {list(p.shape)}"
                )
            values[name] = t
    with torch.no_grad():
        for name, t in values.items():
            params[name].copy_(t.to(params[name].dtype))
    # Quantized matrices: the forward pass must use exactly the stored levels.
    modules = dict(model.named_modules())
    for name, info in described.items():
        if "bits" not in info:
            continue
        parts = name.split(".")
        for i in range(len(parts) - 1, 0, -1):
            module = modules.get(".".join(parts[:i]))
            if isinstance(module, QuantizedWeights):
                module.freeze_quantized(".".join(parts[i:]), params[name], stored[name])
                break


def _stored_codes(
    name: str,
    info: dict[str, Any],
    spec: QuantSpec,
    numel: int,
    tensors: dict[str, Tensor],
    path: Path,
) -> tuple[Tensor, Tensor, Tensor]:
    """The unpacked codes, mu and sigma of quantized matrix ``name``, checked against ``info``."""
    where = f"{path / WEIGHTS}: tensor {name + '.codes'!r}"
    if "codes" not in info:  # format version 1: three tensors per matrix
        for suffix in (".codes", ".mu", ".sigma"):
            if name + suffix not in tensors:
                raise LoadError(f"{path / WEIGHTS}: missing tensor {name + suffix!r}")
        try:
            codes = unpack_codes(tensors[name + ".codes"], spec.bits, numel)
        except PlanError as exc:
            raise LoadError(f"{where}: {exc} (bits={spec.bits} in the manifest)") from exc
        return codes, tensors[name + ".mu"][0], tensors[name + ".sigma"][0]
    for key in (CODES, SCALES):
        if key not in tensors:
            raise LoadError(f"{path / WEIGHTS}: missing tensor {key!r} (needed by {name!r})")
    buf, scales = tensors[CODES], tensors[SCALES]
    try:
        offset, nbytes = (int(v) for v in info["codes"])
        row = int(info["scale"])
    except (KeyError, TypeError, ValueError) as exc:
        raise LoadError(
            f"{path / MANIFEST}: tensor {name!r} needs 'codes': [offset, nbytes] and 'scale': row"
        ) from exc
    need = -(-numel * spec.bits // 8)
    if nbytes != need:
        raise LoadError(
            f"{where}: {nbytes} bytes stored, but {numel} codes of bits={spec.bits} (as the "
            f"manifest says) need {need}; the bit width disagrees with the stored codes"
        )
    if offset < 0 or offset + nbytes > buf.numel():
        raise LoadError(
            f"{where}: its codes end at byte {offset + nbytes}, but {CODES!r} holds only "
            f"{buf.numel()} bytes; the file is truncated or does not belong to this manifest"
        )
    if not 0 <= row < scales.shape[0] or scales.dim() != 2 or scales.shape[1] != 2:
        raise LoadError(
            f"{path / WEIGHTS}: {SCALES!r} has shape {list(scales.shape)}, no (mu, sigma) row "
            f"{row} for {name!r}"
        )
    try:
        codes = unpack_codes(buf[offset : offset + nbytes].contiguous(), spec.bits, numel)
    except PlanError as exc:
        raise LoadError(f"{where}: {exc} (bits={spec.bits} in the manifest)") from exc
    return codes, scales[row, 0], scales[row, 1]


def _check_precision(model: nn.Module, described: dict[str, Any], path: Path) -> None:
    """Every matrix is stored at the precision the saved plan gives its layer."""
    quant = _quantized(model)
    for name, info in described.items():
        spec = quant[name][0] if name in quant else None
        if "bits" not in info:
            if spec is not None:
                raise LoadError(
                    f"{path / MANIFEST}: tensor {name!r} is stored as float, but the saved plan "
                    f"quantizes its layer at bits={spec.bits}"
                )
            continue
        try:
            listed = (int(info["bits"]), str(info.get("criterion", "l1")))
        except (TypeError, ValueError) as exc:
            raise LoadError(f"{path / MANIFEST}: tensor {name!r}: invalid bits ({exc})") from exc
        if spec is None or (spec.bits, spec.criterion) != listed:
            plan = (
                "keeps its layer in float"
                if spec is None
                else f"quantizes its layer at bits={spec.bits} ({spec.criterion})"
            )
            raise LoadError(
                f"{path / MANIFEST}: tensor {name + '.codes'!r} is listed at bits={listed[0]} "
                f"({listed[1]}), but the saved plan {plan}: the bit width disagrees, so its "
                f"codes in {WEIGHTS} cannot be read"
            )


def _check_codes_used(described: dict[str, Any], tensors: dict[str, Tensor], path: Path) -> None:
    """The manifest's byte ranges cover ``quant/codes`` exactly (no missing or extra bytes)."""
    ranges = sorted(
        (int(info["codes"][0]), int(info["codes"][1]), name)
        for name, info in described.items()
        if isinstance(info, dict) and "bits" in info and isinstance(info.get("codes"), list)
    )
    if not ranges:
        return
    if CODES not in tensors:
        raise LoadError(f"{path / WEIGHTS}: missing tensor {CODES!r} (needed by {ranges[0][2]!r})")
    end = 0
    for offset, nbytes, name in ranges:
        if offset != end:
            raise LoadError(
                f"{path / MANIFEST}: tensor {name + '.codes'!r} starts at byte {offset}, expected "
                f"{end} (the manifest's code ranges overlap or leave gaps)"
            )
        end = offset + nbytes
    have = tensors[CODES].numel()
    if have != end:
        first = ranges[0][2]
        widths = {int(described[n]["bits"]) for _, _, n in ranges}
        numels = [math.prod(int(d) for d in described[n]["shape"]) for _, _, n in ranges]
        fits = [b for b in (1, 2, 4, 8) if sum(-(-m * b // 8) for m in numels) == have]
        if len(widths) == 1 and fits and fits[0] not in widths:
            raise LoadError(
                f"{path / WEIGHTS}: tensor {first + '.codes'!r} and the other quantized "
                f"matrices are listed at bits={widths.pop()}, which needs {end} bytes of "
                f"{CODES!r}, but it holds {have}, as bits={fits[0]} would: the bit width "
                "disagrees with the stored codes"
            )
        # Truncated: the first matrix whose codes run past the end; extra bytes: the last.
        last = next((n for off, nb, n in ranges if off + nb > have), ranges[-1][2])
        raise LoadError(
            f"{path / WEIGHTS}: {CODES!r} holds {have} bytes, but the manifest's code ranges "
            f"(bits per tensor) cover {end}: tensor {last + '.codes'!r} and the file disagree "
            f"({'truncated' if have < end else 'extra bytes'})"
        )


def storage_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Bytes on disk per part of a saved adapter and the theoretical bound.

    The bound counts ``bits x weights`` for quantized matrices plus 8 bytes of mu/sigma each,
    and 32 bits per weight for everything else (head, biases, index tensors).

    Returns:
        ``parts`` (bytes of tensor data per method: ``adapter``, ``lora``, ``head``, ...),
        ``bound_bytes``, ``disk_bytes`` (per file), ``total_disk_bytes`` and ``header_bytes``
        (everything on disk that is not tensor data: the JSON manifest and safetensors' header).
    """
    path = Path(path)
    manifest, tensors = _read(path)
    parts: dict[str, int] = {}
    bound = 0.0
    for name, info in _describe(manifest, path / MANIFEST).items():
        numel = math.prod(int(d) for d in info["shape"])
        method = info.get("method", "other")
        if "bits" in info and "codes" in info:
            nbytes = int(info["codes"][1]) + 2 * tensors[SCALES].element_size()
            bound += numel * int(info["bits"]) / 8 + 8
        elif "bits" in info:
            nbytes = sum(
                tensors[name + s].numel() * tensors[name + s].element_size()
                for s in (".codes", ".mu", ".sigma")
            )
            bound += numel * int(info["bits"]) / 8 + 8
        elif "stored" in info:
            nbytes = numel * tensors[info["stored"][0]].element_size()
            bound += numel * 4
        else:
            nbytes = tensors[name].numel() * tensors[name].element_size()
            bound += numel * 4
        parts[method] = parts.get(method, 0) + nbytes
    for k, t in tensors.items():
        if k.startswith("plan/"):
            parts["plan"] = parts.get("plan", 0) + t.numel() * t.element_size()
            bound += t.numel() * t.element_size()
    disk = {f: (path / f).stat().st_size for f in (MANIFEST, WEIGHTS)}
    return {
        "parts": parts,
        "bound_bytes": int(round(bound)),
        "disk_bytes": disk,
        "total_disk_bytes": sum(disk.values()),
        "header_bytes": sum(disk.values()) - sum(parts.values()),
    }


def save_plan(plan: Plan, path: str | os.PathLike[str]) -> Path:
    """Write a plan as ``plan.json`` + ``plan.safetensors`` (its index tensors)."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous().cpu() for k, v in plan.tensors.items()}
    atomic_write(
        out / "plan.safetensors",
        lambda tmp: save_file(tensors, tmp, metadata={"format": "slimtune-plan"}),
    )
    atomic_write_text(out / "plan.json", json.dumps(plan.to_dict(), indent=1))
    return out


def load_plan(path: str | os.PathLike[str]) -> Plan:
    """Read a plan written by :func:`save_plan`."""
    path = Path(path)
    try:
        data = json.loads((path / "plan.json").read_text(encoding="utf-8"))
        tensors = load_file(str(path / "plan.safetensors"))
    except (OSError, json.JSONDecodeError, SafetensorError) as exc:
        raise LoadError(f"{path}: cannot read plan ({exc})") from exc
    try:
        return Plan.from_dict(data, tensors)
    except PlanError as exc:
        raise LoadError(f"{path / 'plan.json'}: {exc}") from exc
