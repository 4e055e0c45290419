"""Saving and loading adapters: ``slimtune.json`` (manifest) + ``adapter.safetensors``.

The manifest holds the plan, library versions, the base model's fingerprint and a description
of every tensor (shape, dtype, and for quantized matrices bits/criterion and where their codes
are). The safetensors file holds, by name, the trainable tensors, the plan's index tensors
(``plan/...``) and, for quantized matrices, two shared tensors: ``quant/codes`` (uint8, every
matrix's bit-packed codes back to back, each starting on a byte) and ``quant/scales`` (float32,
one ``(mu, sigma)`` row per matrix). A quantized matrix's manifest entry gives its byte range
``"codes": [offset, nbytes]`` and its row ``"scale": i``, so a 1-bit adapter costs its bits plus
8 bytes per matrix and a header of a few hundred bytes, not a header entry per tensor::

    "blocks.0.mlp.down.weight": {"shape": [32, 384], "bits": 1, "codes": [0, 1536], "scale": 0, ...}

(Files of format version 1 kept ``<name>.codes``/``.mu``/``.sigma`` per matrix; they still load.)
Nothing is pickled. Every file is written atomically (temporary file + rename).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
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
from .plan import Plan
from .quant import QuantSpec, decode, encode, pack_codes, unpack_codes

__all__ = [
    "save",
    "load",
    "atomic_write",
    "atomic_write_text",
    "storage_report",
    "MANIFEST",
    "WEIGHTS",
]

MANIFEST = "slimtune.json"
WEIGHTS = "adapter.safetensors"
FORMAT = "slimtune-adapter"
FORMAT_VERSION = 2
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


def _collect(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Tensors to save and their manifest descriptions."""
    state = get_state(model)
    owner = method_parameters(model)
    quant = _quantized(model)
    tensors: dict[str, Tensor] = {}
    described: dict[str, Any] = {}
    packed: list[Tensor] = []
    scales: list[Tensor] = []
    offset = 0
    for name, p in model.named_parameters():
        if owner[name] == "base":
            continue
        t = p.detach()
        if name in quant:
            spec, module, attr = quant[name]
            stored_codes = module.stored_codes(attr, p)
            codes, mu, sigma = stored_codes if stored_codes is not None else encode(t, spec)
            packed.append(pack_codes(codes, spec.bits).cpu())
            described[name] = {
                "shape": list(t.shape),
                "dtype": str(t.dtype).removeprefix("torch."),
                "bits": spec.bits,
                "criterion": spec.criterion,
                "method": owner[name],
                "codes": [offset, packed[-1].numel()],
                "scale": len(scales),
            }
            scales.append(torch.stack([mu.reshape(()), sigma.reshape(())]).float().cpu())
            offset += packed[-1].numel()
        else:
            tensors[name] = t.contiguous().cpu()
            described[name] = {
                "shape": list(t.shape),
                "dtype": str(t.dtype).removeprefix("torch."),
                "method": owner[name],
            }
    if packed:
        tensors[CODES] = torch.cat(packed)
        tensors[SCALES] = torch.stack(scales)
    for key, t in state.plan.tensors.items():
        tensors["plan/" + key] = t.contiguous().cpu()
    return {k: v.contiguous().cpu() for k, v in tensors.items()}, described


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
        "plan": state.plan.to_dict(),
        "added_biases": state.added_biases,
        "tensors": described,
        "merged_when_saved": bool(merged),
    }
    atomic_write(out / WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT}))
    # Compact JSON: with many small quantized matrices, indentation alone would cost more
    # than the 1-bit weights of a small adapter (``python -m json.tool`` pretty-prints it).
    atomic_write_text(out / MANIFEST, json.dumps(manifest, separators=(",", ":")) + "\n")
    return out


def _read(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    mpath, wpath = path / MANIFEST, path / WEIGHTS
    if not path.is_dir():
        raise LoadError(f"{path}: no such adapter directory")
    for f in (mpath, wpath):
        if not f.is_file():
            raise LoadError(
                f"{f}: missing (a slimtune adapter directory holds {MANIFEST} and {WEIGHTS})"
            )
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LoadError(
            f"{mpath}: not valid JSON ({exc}); the file is corrupted or not a slimtune manifest"
        ) from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise LoadError(f"{mpath}: not a slimtune adapter manifest (expected format {FORMAT!r})")
    if int(manifest.get("format_version", 0)) > FORMAT_VERSION:
        raise LoadError(
            f"{mpath}: format version {manifest['format_version']} is newer than supported ({FORMAT_VERSION})"
        )
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
        _restore(model, manifest, tensors, path)
    except BaseException:
        remove(model)
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, p.requires_grad))
        raise
    return model


def _restore(
    model: nn.Module, manifest: dict[str, Any], tensors: dict[str, Tensor], path: Path
) -> None:
    owner = method_parameters(model)
    params = dict(model.named_parameters())
    described: dict[str, Any] = manifest.get("tensors", {})
    expected = {n for n, m in owner.items() if m != "base"}
    missing = sorted(expected - set(described))
    if missing:
        raise LoadError(f"{path / MANIFEST}: no tensor for {missing[0]!r} ({len(missing)} missing)")
    extra = sorted(set(described) - set(params))
    if extra:
        raise LoadError(
            f"{path}: tensor {extra[0]!r} has no place in this model ({len(extra)} unknown)"
        )
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
        last = ranges[-1][2]
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
    for name, info in manifest.get("tensors", {}).items():
        numel = 1
        for d in info["shape"]:
            numel *= int(d)
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
