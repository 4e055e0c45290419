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

Blocks may keep different numbers of heads and neurons; :mod:`slimtune.io.pruned` saves and
reloads a pruned backbone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from ..core import family_of
from ..errors import PlanError
from ..families import Family
from ..methods.base import Wrapper, unwrap
from ..methods.lora import LoRALinear
from .blocks import block_infos, head_columns

__all__ = ["shrink"]


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
    family = family or family_of(model)
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
