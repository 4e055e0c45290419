"""Saving and loading adapters: ``slimtune.json`` (manifest) + ``adapter.safetensors``.

:func:`save` writes the methods applied to a model (never the base); :func:`load` applies a
saved adapter to a fresh base model and restores its tensors exactly, or leaves the model as it
was. The file layout is described in :mod:`slimtune.io.manifest`; files of format versions 1
and 2 still load (:mod:`slimtune.io.legacy`). Nothing is pickled.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as save_bytes
from torch import Tensor, nn

from ..core import family_of, get_state, method_parameters
from ..errors import LoadError, PlanError
from ..methods.base import QuantizedWeights, Wrapper
from ..passes.base_pruning import pruning_of, remember, replay
from ..plan import Plan
from ..quant import QuantSpec, decode, encode, pack_codes, unpack_codes
from .attach import apply_and_fill
from .digests import (
    DIGEST_TENSOR,
    WEIGHTS_KEY,
    canonical_digest,
    digest_tensor,
    digest_text,
    file_digest,
)
from .files import group_file, write_bytes, write_group
from .legacy import v1_codes, v1_nbytes
from .manifest import (
    CODES,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    SCALES,
    WEIGHTS,
    describe_tensors,
    group_tensors,
    manifest_text,
    read_manifest,
    versions,
)
from .peft import import_peft, is_peft_dir
from .task import PRUNED_KEY, pruning_entry, read_pruning

__all__ = ["save", "load", "restore", "storage_report"]


def _quantized(model: nn.Module) -> dict[str, tuple[QuantSpec, QuantizedWeights, str]]:
    """Names of quantized weight parameters -> (precision, owning wrapper, name inside it)."""
    out: dict[str, tuple[QuantSpec, QuantizedWeights, str]] = {}
    for name, module in model.named_modules():
        spec = getattr(module, "quant", None)
        if isinstance(module, QuantizedWeights) and isinstance(spec, QuantSpec) and spec.bits < 32:
            for pname in module.quantized_params:
                out[f"{name}.{pname}"] = (spec, module, pname)
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
    groups = group_tensors(infos, reserved={CODES, SCALES, *tensors})
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


def save(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Save the methods applied to ``model`` (not the base) into directory ``path``.

    Writes ``slimtune.json`` and ``adapter.safetensors``; returns the directory. A pruned model
    (:mod:`slimtune.passes.base_pruning`) also gets which heads and neurons its original base
    keeps and compensation's bias shifts (:mod:`slimtune.io.task`): the directory is then a task
    file that :func:`load` applies to the original base.
    """
    state = get_state(model)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    merged = [n for n, m in model.named_modules() if isinstance(m, Wrapper) and m.merged]
    tensors, described = _collect(model)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "versions": versions(),
        "base": state.fingerprint,
        "plan": _lean(state.plan.to_dict(compact=True)),
        "tensors": described,
    }
    # informational keys, written only when they say something (bytes count in a task file)
    if state.added_biases:
        manifest["added_biases"] = state.added_biases
    if merged:
        manifest["merged_when_saved"] = True
    pruning = pruning_of(model)
    if pruning is not None:  # a task file: the pruning of the original base too
        manifest[PRUNED_KEY], extra = pruning_entry(pruning)
        tensors.update(extra)
    # weights first, tied to the manifest that follows them (see slimtune.io.digests); the
    # digest is a tensor, not metadata: safetensors writes metadata keys in no fixed order
    tensors[DIGEST_TENSOR] = digest_tensor(canonical_digest(manifest))
    metadata = {"format": FORMAT}

    def weights(tmp: str) -> None:
        write_bytes(tmp, save_bytes(tensors, metadata=metadata))
        manifest[WEIGHTS_KEY] = file_digest(Path(tmp))

    def text(tmp: str) -> None:
        write_bytes(tmp, manifest_text(manifest).encode("utf-8"))

    # one group: a crash leaves the old adapter or the new one (slimtune.io.files)
    write_group(out, {WEIGHTS: weights, MANIFEST: text})
    return out


def _lean(plan: dict[str, Any]) -> dict[str, Any]:
    """The plan as an adapter stores it: SPT's per-tensor counts left out of its meta (they
    explain the allocation, they do not rebuild it; results.json and plan files keep them)."""
    spt = plan.get("meta", {}).get("spt")
    if isinstance(spt, dict) and "counts" in spt:
        spt = {k: v for k, v in spt.items() if k != "counts"}
        plan = {**plan, "meta": {**plan["meta"], "spt": spt}}
    return plan


def _read(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    mpath, wpath = group_file(path, MANIFEST), group_file(path, WEIGHTS)
    if not path.is_dir():
        raise LoadError(f"{path}: no such adapter directory")
    for f in (mpath, wpath):
        if not f.is_file():
            raise LoadError(
                f"{f}: missing (a slimtune adapter directory holds {MANIFEST} and {WEIGHTS})"
            )
    manifest = read_manifest(mpath)
    try:
        tensors = load_file(str(wpath))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise LoadError(
            f"{wpath}: cannot read tensors ({exc}); the file is truncated, corrupted or not safetensors"
        ) from exc
    digest = tensors.pop(DIGEST_TENSOR, None)
    _check_digests(path, manifest, None if digest is None else digest_text(digest))
    return manifest, tensors


def _check_digests(path: Path, manifest: dict[str, Any], want_m: str | None) -> None:
    """The two files vouch for each other (:mod:`slimtune.io.digests`)."""
    want_w = manifest.get(WEIGHTS_KEY)
    if want_w is not None and file_digest(group_file(path, WEIGHTS)) != want_w:
        raise LoadError(
            f"{path / WEIGHTS}: does not match {MANIFEST}'s sha256: the file was changed or "
            "corrupted, or a save into this directory was interrupted"
        )
    if want_m is not None and canonical_digest(manifest) != want_m:
        raise LoadError(
            f"{path / MANIFEST}: does not match the sha256 recorded in {WEIGHTS}: the manifest "
            "was changed or corrupted, or a save into this directory was interrupted"
        )
    if (want_w is None) != (want_m is None):
        raise LoadError(
            f"{path}: only one of its two files carries a digest: changed, corrupted or mixed "
            "from two saves"
        )


def _check_base(
    model: nn.Module,
    manifest: dict[str, Any],
    plan: Plan,
    path: Path,
    *,
    original: bool = False,
    have: dict[str, Any] | None = None,
) -> None:
    """The model's fingerprint (``have``, computed when not given) against the adapter's base
    (``original``: a task file's original, unpruned base, before the pruning is replayed)."""
    from ..core import fingerprint

    want = manifest[PRUNED_KEY]["base"] if original else manifest.get("base", {})
    have = have if have is not None else fingerprint(model, exclude=plan.head)
    if want.get("quant") != have["quant"]:
        raise LoadError(f"{path}: {_quant_mismatch(want.get('quant'), have['quant'])}")
    if want.get("structure") != have["structure"]:
        raise LoadError(
            f"{path}: the adapter was trained on a different architecture "
            f"({want.get('params')} base parameters, structure {want.get('structure')}; this model has "
            f"{have['params']}, structure {have['structure']})"
        )
    if "dtypes" in want and want["dtypes"] != have["dtypes"]:
        raise LoadError(
            f"{path}: the adapter was trained on a base in {', '.join(want['dtypes'])}, this "
            f"one is in {', '.join(have['dtypes'])}: load the base in the same dtype "
            "(torch_dtype=...) so its values can be checked"
        )
    # every value (``values``) where the adapter recorded it, else the older strided sample
    key = "values" if "values" in want else "weights"
    if want.get(key) != have[key]:
        raise LoadError(
            f"{path}: the base model's weights differ from the ones the adapter was trained on "
            f"(fingerprint {have[key]} != {want.get(key)}); load it onto the same base checkpoint"
        )


def _quant_mismatch(want: dict[str, Any] | None, have: dict[str, Any] | None) -> str:
    from ..qbase import BaseQuant

    def text(d: dict[str, Any] | None) -> str:
        return (
            "a float (unquantized) base"
            if d is None
            else f"a base quantized as {BaseQuant.from_dict(d).describe()}"
        )

    hint = (
        "quantize this base the same way with slimtune.quantize_base(model, ...) before loading"
        if want is not None
        else "load it onto the float base (without quantize_base)"
    )
    return f"the adapter was trained on {text(want)}, this model has {text(have)}; {hint}"


def load(model: nn.Module, path: str | os.PathLike[str], *, check_base: bool = True) -> nn.Module:
    """Apply a saved adapter to a fresh base model and restore its tensors exactly.

    ``path`` may also be a Hugging Face peft LoRA folder (``adapter_config.json``), imported
    by :func:`slimtune.io.peft.import_peft`.

    A task file (saved from a pruned model) is loaded onto the *original* base: its
    fingerprint is checked, the pruning replayed (:func:`slimtune.passes.base_pruning.replay`),
    then the methods restored. A model that has the pruned shapes already (a backbone from
    :func:`slimtune.io.load_pruned`) takes the methods directly.

    Raises:
        LoadError: missing/corrupted/foreign files, a different base model, a missing tensor or
            a shape mismatch. On any error the model is left as it was (a task file's pruning,
            once replayed, stays: everything that can be checked is checked before it).
    """
    path = Path(path)
    if not (path / MANIFEST).is_file() and is_peft_dir(path):
        return import_peft(model, path)  # a peft LoRA folder
    manifest, tensors, described, plan = _read_plan(path)
    pruning = read_pruning(manifest, tensors, path)
    pruned_already = False
    have: dict[str, Any] | None = None  # the base's fingerprint, read once while it holds
    if pruning is not None:
        from ..core import fingerprint

        have = fingerprint(model, exclude=plan.head)  # every value read: once, not per check
        structure = have["structure"]
        if structure == pruning.base.get("structure") and pruning_of(model) is None:
            if check_base:
                _check_base(model, manifest, plan, path, original=True, have=have)
            have = None  # the replay changes the base
            try:  # the original base: prune it as the task says (it stays pruned)
                replay(model, pruning, family_of(model))
            except PlanError as exc:
                raise LoadError(f"{path}: cannot prune this base as the task says ({exc})") from exc
        elif structure == manifest.get("base", {}).get("structure"):
            pruned_already = True  # shrunk to the task's shapes (slimtune.io.load_pruned)
        else:
            raise LoadError(
                f"{path}: a task file applies to the original, unpruned base (or to one pruned "
                "exactly as the task says); this model is neither"
            )
    if check_base:  # a task file: the replayed pruning gave exactly the base it was trained on
        _check_base(model, manifest, plan, path, have=have)
    out = apply_and_fill(model, plan, lambda: _restore(model, described, tensors, path), path)
    if pruned_already and pruning is not None:
        remember(model, pruning)  # only once everything loaded
    return out


def _read_plan(
    path: Path,
) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, Any], Plan]:
    """The manifest, the tensors, the tensor descriptions and the plan of an adapter folder."""
    manifest, tensors = _read(path)
    described = describe_tensors(manifest, path / MANIFEST)
    plan_tensors = {k[len("plan/") :]: v for k, v in tensors.items() if k.startswith("plan/")}
    try:
        plan = Plan.from_dict(manifest["plan"], plan_tensors)
    except (PlanError, KeyError, TypeError) as exc:
        raise LoadError(f"{path / MANIFEST}: invalid plan ({exc})") from exc
    return manifest, tensors, described, plan


def restore(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Put a saved adapter's tensors back into a model that already has the same methods
    applied (resuming training from a checkpoint: the optimizer keeps its parameters).

    Raises:
        LoadError: files as in :func:`load`, another plan than the model's, or another base.
    """
    path = Path(path)
    state = get_state(model)
    manifest, tensors, described, plan = _read_plan(path)
    read_pruning(manifest, tensors, path)
    if _lean(plan.to_dict()) != _lean(state.plan.to_dict()):
        raise LoadError(f"{path}: saved with another plan than the one applied to this model")
    want = manifest.get("base")
    have = state.fingerprint
    if not isinstance(want, dict) or any(want.get(k) != have.get(k) for k in want):
        # keys the adapter's slimtune did not record yet (``values``, ``dtypes``) are not compared
        raise LoadError(f"{path}: saved from another base model than this one")
    _restore(model, described, tensors, path)
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
    for name, (_, mu, sigma) in stored.items():
        if not (torch.isfinite(mu).all() and torch.isfinite(sigma).all()) or (sigma < 0).any():
            raise LoadError(
                f"{path / WEIGHTS}: tensor {name!r}: its quantization scales are not finite "
                f"numbers (mu {mu.tolist()}, sigma {sigma.tolist()})"
            )
    for name, t in values.items():
        _check_values(name, t, params[name], path)
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


def _check_values(name: str, t: Tensor, p: Tensor, path: Path) -> None:
    """A stored tensor must be of the parameter's kind (floats for floats) and finite."""
    if p.is_floating_point() and not t.is_floating_point():
        raise LoadError(
            f"{path / WEIGHTS}: tensor {name!r} is {t.dtype}, the model's parameter is {p.dtype}"
        )
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise LoadError(f"{path / WEIGHTS}: tensor {name!r} has {bad} NaN or infinite values")


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
        return v1_codes(name, spec, numel, tensors, path, WEIGHTS)
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
    for name, info in describe_tensors(manifest, path / MANIFEST).items():
        numel = math.prod(int(d) for d in info["shape"])
        method = info.get("method", "other")
        if "bits" in info and "codes" in info:
            nbytes = int(info["codes"][1]) + 2 * tensors[SCALES].element_size()
            bound += numel * int(info["bits"]) / 8 + 8
        elif "bits" in info:
            nbytes = v1_nbytes(name, tensors)
            bound += numel * int(info["bits"]) / 8 + 8
        elif "stored" in info:
            nbytes = numel * tensors[info["stored"][0]].element_size()
            bound += numel * 4
        else:
            nbytes = tensors[name].numel() * tensors[name].element_size()
            bound += numel * 4
        parts[method] = parts.get(method, 0) + nbytes
    for k, t in tensors.items():
        if k.startswith(PRUNED_KEY + "/"):
            parts["pruning"] = parts.get("pruning", 0) + t.numel() * t.element_size()
            bound += t.numel() * t.element_size()
        if k.startswith("plan/"):
            parts["plan"] = parts.get("plan", 0) + t.numel() * t.element_size()
            bound += t.numel() * t.element_size()
    disk = {f: group_file(path, f).stat().st_size for f in (MANIFEST, WEIGHTS)}
    return {
        "parts": parts,
        "bound_bytes": int(round(bound)),
        "disk_bytes": disk,
        "total_disk_bytes": sum(disk.values()),
        "header_bytes": sum(disk.values()) - sum(parts.values()),
    }
