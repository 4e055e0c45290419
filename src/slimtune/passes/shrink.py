"""Physical head and FFN-neuron pruning of transformer blocks, through the backbone family.

A block's structure comes from its family's :class:`~slimtune.families.BlockSpec`::

    heads:   q, k, v rows    [h0 | h1 | ... ]  (head_dim rows per head)  -> keep rows of kept heads
             o columns       [h0 | h1 | ... ]                            -> keep the same columns
    neurons: fc1 rows / bias, fc2 columns                                -> keep kept neurons

Removing a head or a neuron this way gives exactly the model in which that head's output (the
input of ``o``) or that neuron's activation (the input of ``fc2``) is multiplied by zero. LoRA
wrappers are sliced alongside their base layer (``B`` rows for q/k/v/fc1, ``A`` columns for
o/fc2), so a model with LoRA applied can be shrunk in place.

The attention module's head count attributes (the family's ``heads_attr``; also HF's derived
``all_head_size`` when present) are lowered so the forward reshapes to the new number of heads.
Blocks may keep different numbers of heads and neurons. ``transformers`` cannot express that in a
``config.json`` (BERT derives the head size from ``hidden_size / num_attention_heads``), so a
pruned backbone is stored in its own small format by :func:`save_pruned`: ``model.safetensors``
(every tensor of the pruned model, nothing pickled) and ``pruned.json`` (the kept size of each
block). :func:`load_pruned` shrinks a freshly built, unpruned model of the same architecture to
those sizes and loads the tensors into it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..errors import LoadError, PlanError
from ..families import Family, detect_family
from ..methods.base import Wrapper, unwrap
from ..methods.lora import LoRALinear

__all__ = [
    "BlockInfo",
    "block_infos",
    "head_columns",
    "shrink",
    "layer_params",
    "base_state_dict",
    "save_pruned",
    "load_pruned",
    "PRUNED_MANIFEST",
    "PRUNED_WEIGHTS",
]

PRUNED_MANIFEST = "pruned.json"
PRUNED_WEIGHTS = "model.safetensors"
FORMAT = "slimtune-pruned"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class BlockInfo:
    """One transformer block: full module names of its linears and its current sizes.

    Attributes:
        name: the block's module name.
        attention: module name owning the head count attributes.
        q, k, v, o, fc1, fc2: full module names of the six linears (possibly wrapped).
        num_heads: current number of attention heads.
        head_dim: size of one head (rows of q/k/v per head).
        ffn: current number of FFN intermediate neurons.
    """

    name: str
    attention: str
    q: str
    k: str
    v: str
    o: str
    fc1: str
    fc2: str
    num_heads: int
    head_dim: int
    ffn: int


def _sub(model: nn.Module, block: str, rel: str) -> str:
    """Full name of ``rel`` inside ``block``, looking through a wrapped block (``base_layer``)."""
    for name in (f"{block}.{rel}", f"{block}.base_layer.{rel}"):
        try:
            model.get_submodule(name)
            return name
        except AttributeError:
            continue
    raise PlanError(f"block {block!r} has no module {rel!r}: the family's block spec does not fit")


def _heads_of(attention: nn.Module, attrs: Sequence[str], where: str) -> int:
    for attr in attrs:
        value = getattr(attention, attr, None)
        if isinstance(value, int):
            return value
    raise PlanError(f"{where} has none of the head count attributes {list(attrs)}")


def block_infos(model: nn.Module, family: Family | None = None) -> list[BlockInfo]:
    """The blocks of ``model`` with their linears and sizes, in model order.

    Raises:
        PlanError: the family describes no block structure, or the model has no block.
    """
    family = family or detect_family(model)
    spec = family.block
    if spec is None:
        raise PlanError(
            f"the {family.name} family describes no block structure (BlockSpec): "
            "head and neuron pruning needs a known backbone family (bert, vit, tsvit)"
        )
    out = []
    for block in family.block_names(model):
        names = {
            r: _sub(model, block, getattr(spec, r)) for r in ("q", "k", "v", "o", "fc1", "fc2")
        }
        att_name = _sub(model, block, spec.attention)
        att = model.get_submodule(att_name)
        heads = _heads_of(att, spec.heads_attr, att_name)
        o = unwrap(model.get_submodule(names["o"]))
        fc1 = unwrap(model.get_submodule(names["fc1"]))
        assert isinstance(o, nn.Linear) and isinstance(fc1, nn.Linear)
        head_dim = getattr(att, spec.head_dim, None) if spec.head_dim else None
        if not isinstance(head_dim, int):
            head_dim = o.in_features // max(heads, 1)
        if heads * head_dim != o.in_features:
            raise PlanError(
                f"{att_name}: {heads} heads x {head_dim} != {o.in_features} inputs of {names['o']}"
            )
        out.append(
            BlockInfo(
                block, att_name, num_heads=heads, head_dim=head_dim, ffn=fc1.out_features, **names
            )
        )
    if not out:
        raise PlanError(f"no {family.name} block found in this model (pattern {family.blocks!r})")
    return out


def _replace(module: nn.Module, attr: str, value: Tensor) -> None:
    old = getattr(module, attr)
    setattr(module, attr, nn.Parameter(value.detach().clone(), requires_grad=old.requires_grad))


def _linear(module: nn.Module, where: str) -> nn.Linear:
    if isinstance(module, Wrapper) and not isinstance(module, LoRALinear):
        raise PlanError(
            f"{where} is wrapped by {type(module).__name__}: only LoRA-wrapped or plain linears "
            "can be pruned (prune before applying other methods)"
        )
    base = unwrap(module)
    if not isinstance(base, nn.Linear):
        raise PlanError(f"{where} is a {type(base).__name__}, not an nn.Linear")
    return base


@torch.no_grad()
def _slice_out(model: nn.Module, name: str, idx: Tensor) -> None:
    """Keep the output rows ``idx`` of linear ``name`` (and the matching LoRA ``B`` rows)."""
    module = model.get_submodule(name)
    lin = _linear(module, name)
    _replace(lin, "weight", lin.weight[idx])
    if lin.bias is not None:
        _replace(lin, "bias", lin.bias[idx])
    lin.out_features = len(idx)
    if isinstance(module, LoRALinear):
        if module.merged:
            raise PlanError(f"{name}: unmerge LoRA before pruning")
        _replace(module, "lora_B", module.lora_B[idx])


@torch.no_grad()
def _slice_in(model: nn.Module, name: str, idx: Tensor) -> None:
    """Keep the input columns ``idx`` of linear ``name`` (and the matching LoRA ``A`` columns)."""
    module = model.get_submodule(name)
    lin = _linear(module, name)
    _replace(lin, "weight", lin.weight[:, idx])
    lin.in_features = len(idx)
    if isinstance(module, LoRALinear):
        if module.merged:
            raise PlanError(f"{name}: unmerge LoRA before pruning")
        _replace(module, "lora_A", module.lora_A[:, idx])


def _indices(keep: Sequence[int], n: int, what: str) -> Tensor:
    idx = sorted({int(i) for i in keep})
    if not idx:
        raise PlanError(f"{what}: cannot remove all {n}; keep at least one")
    if idx[0] < 0 or idx[-1] >= n:
        raise PlanError(f"{what}: index out of range [0, {n}): {idx}")
    return torch.tensor(idx, dtype=torch.long)


def head_columns(heads: Sequence[int] | Tensor, head_dim: int) -> Tensor:
    """The positions of ``heads`` in an attention layer's concatenated head outputs (the rows
    of q, k, v and the input columns of o), head by head."""
    idx = torch.as_tensor(heads, dtype=torch.long).reshape(-1)
    return (idx[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def shrink(
    model: nn.Module,
    heads: Mapping[str, Sequence[int]] | None = None,
    neurons: Mapping[str, Sequence[int]] | None = None,
    family: Family | None = None,
) -> nn.Module:
    """Physically remove heads and FFN neurons, in place.

    Args:
        model: the model (plain, or with LoRA wrappers on its linears).
        heads: block name -> indices of the heads to keep (blocks not listed keep all).
        neurons: block name -> indices of the FFN neurons to keep.
        family: the model's family (default: detected).

    Returns:
        ``model``.

    Raises:
        PlanError: an empty keep list (a block must keep at least one head and one neuron),
            an index out of range, an unknown block name, or an unsupported wrapper.
    """
    family = family or detect_family(model)
    infos = {b.name: b for b in block_infos(model, family)}
    assert family.block is not None
    for what, given in (("heads", heads or {}), ("neurons", neurons or {})):
        unknown = sorted(set(given) - set(infos))
        if unknown:
            raise PlanError(f"{what} given for unknown block(s) {unknown}; blocks: {list(infos)}")
    for name, b in infos.items():
        if heads and name in heads:
            keep = _indices(heads[name], b.num_heads, f"{name} heads")
            rows = head_columns(keep, b.head_dim)
            for lin in (b.q, b.k, b.v):
                _slice_out(model, lin, rows)
            _slice_in(model, b.o, rows)
            att = model.get_submodule(b.attention)
            for attr in family.block.heads_attr:
                if isinstance(getattr(att, attr, None), int):
                    setattr(att, attr, len(keep))
            if isinstance(getattr(att, "all_head_size", None), int):
                att.all_head_size = len(keep) * b.head_dim  # type: ignore[assignment]
        if neurons and name in neurons:
            keep = _indices(neurons[name], b.ffn, f"{name} FFN neurons")
            _slice_out(model, b.fc1, keep)
            _slice_in(model, b.fc2, keep)
    return model


def layer_params(model: nn.Module, family: Family | None = None) -> int:
    """Parameters of the blocks' attention and FFN linears (q, k, v, o, fc1, fc2 with biases).

    This is what Light-PEFT prunes and how its pruned fraction is counted: embeddings, norms,
    the pooler and the head are excluded. LoRA parameters are not counted.
    """
    total = 0
    for b in block_infos(model, family):
        for name in (b.q, b.k, b.v, b.o, b.fc1, b.fc2):
            lin = unwrap(model.get_submodule(name))
            total += sum(p.numel() for p in lin.parameters(recurse=False))
    return total


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
        {"name": b.name, "heads": b.num_heads, "head_dim": b.head_dim, "ffn": b.ffn}
        for b in block_infos(model, family)
    ]


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
    from ..io import atomic_write, atomic_write_text

    family = family or detect_family(model)
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
    family = family or detect_family(model)
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
            heads={s["name"]: range(int(s["heads"])) for s in saved},
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
        model.load_state_dict(tensors, strict=True, assign=assign)
    except RuntimeError as exc:
        raise LoadError(f"{path}: tensors do not fit this model: {exc}") from exc
    return model
