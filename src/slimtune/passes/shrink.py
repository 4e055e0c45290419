"""Physical head and FFN-neuron pruning of transformer blocks, through the backbone family.

A block's structure comes from its family's :class:`~slimtune.families.BlockSpec`::

    heads:   q, k, v rows    [h0 | h1 | ... ]  (head_dim rows per head)  -> keep rows of kept heads
             o columns       [h0 | h1 | ... ]                            -> keep the same columns
    neurons: fc1 rows / bias, fc2 columns                                -> keep kept neurons

Removing a head or a neuron this way gives exactly the model in which that head's output (the
input of ``o``) or that neuron's activation (the input of ``fc2``) is multiplied by zero. LoRA
wrappers are sliced alongside their base layer (``B`` rows for q/k/v/fc1, ``A`` columns for
o/fc2), so a model with LoRA applied can be shrunk in place.

The attention module's head count attributes (the family's ``heads_attr``; the width attributes
such as HF's ``all_head_size`` or GPT-2's ``split_size``) are lowered so the forward reshapes to
the new number of heads.

Decoder layouts::

    gated FFN (Llama):   gate rows and up rows (fc1) and down columns (fc2) of a neuron go together
    fused qkv (GPT-2):   c_attn's output [q | k | v]: a head's slice is removed from each third
    Conv1D (GPT-2):      weight [in, out]: "rows" of the map are its columns, and vice versa
    grouped-query attention (Llama, Mistral, Qwen): query head h uses key/value head h // G. The
        kept query heads must keep the same number c per surviving group: the surviving groups'
        k/v rows stay and the attention's ``num_key_value_groups`` becomes c. Whole groups
        (c = G) and the same count in every group are both of this form.

A quantized base (:func:`slimtune.quantize_base`): the linears a block loses rows or columns of
are dequantized, sliced, and quantized again with the same settings (an error of the order of
one quantization step on their values; int8 rows that are kept whole keep their values, one
scale per row); linears that lose nothing keep their codes.

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
from ..linear import is_linear, is_transposed, weight_oi
from ..methods.base import Wrapper, set_module, unwrap
from ..methods.lora import LoRALinear
from ..qbase.layers import dequantize_linear, is_quantized, quantize_linear, spec_of
from ..qbase.spec import BaseQuant
from .blocks import BlockInfo, block_infos, head_columns

__all__ = ["shrink"]


def _replace(module: nn.Module, attr: str, value: Tensor) -> None:
    old = getattr(module, attr)
    setattr(module, attr, nn.Parameter(value.detach().clone(), requires_grad=old.requires_grad))


def _linear(module: nn.Module, where: str) -> nn.Module:
    if isinstance(module, Wrapper) and not isinstance(module, LoRALinear):
        raise PlanError(
            f"{where} is wrapped by {type(module).__name__}: only LoRA-wrapped or plain linears "
            "can be pruned (prune before applying other methods)"
        )
    base = unwrap(module)
    if not is_linear(base):
        raise PlanError(f"{where} is a {type(base).__name__}, not a linear layer")
    if isinstance(module, LoRALinear) and module.merged:
        raise PlanError(f"{where}: unmerge LoRA before pruning")
    return base


@torch.no_grad()
def _slice_out(model: nn.Module, name: str, idx: Tensor) -> None:
    """Keep the output rows ``idx`` of linear ``name`` (and the matching LoRA ``B`` rows)."""
    module = model.get_submodule(name)
    lin = _linear(module, name)
    w, bias = lin.weight, lin.bias
    assert isinstance(w, Tensor)
    _replace(lin, "weight", w[:, idx] if is_transposed(lin) else w[idx])
    if isinstance(bias, Tensor):
        _replace(lin, "bias", bias[idx])
    if is_transposed(lin):
        lin.nf = len(idx)  # type: ignore[assignment]
    else:
        lin.out_features = len(idx)  # type: ignore[assignment]
    if isinstance(module, LoRALinear):
        if module.rows is None:
            _replace(module, "lora_B", module.lora_B[idx])
            return
        # the update covers some rows only: keep those of them that survive, renumbered
        where = {int(r): j for j, r in enumerate(module.rows.tolist())}
        kept = [(i, where[int(r)]) for i, r in enumerate(idx.tolist()) if int(r) in where]
        if not kept:
            raise PlanError(f"{name}: pruning would remove every row LoRA updates")
        _replace(module, "lora_B", module.lora_B[torch.tensor([j for _, j in kept])])
        module.rows = torch.tensor([i for i, _ in kept], device=module.rows.device)


@torch.no_grad()
def _slice_in(model: nn.Module, name: str, idx: Tensor) -> None:
    """Keep the input columns ``idx`` of linear ``name`` (and the matching LoRA ``A`` columns)."""
    module = model.get_submodule(name)
    lin = _linear(module, name)
    w = lin.weight
    assert isinstance(w, Tensor)
    _replace(lin, "weight", w[idx] if is_transposed(lin) else w[:, idx])
    if not is_transposed(lin):
        lin.in_features = len(idx)  # type: ignore[assignment]
    if isinstance(module, LoRALinear):
        _replace(module, "lora_A", module.lora_A[:, idx])


def _kept_groups(keep: Tensor, b: BlockInfo, what: str) -> tuple[list[int], int]:
    """The key/value heads that kept query heads ``keep`` use, and the query heads per group."""
    g = b.group_size
    counts: dict[int, int] = {}
    for h in keep.tolist():
        counts[h // g] = counts.get(h // g, 0) + 1
    per = set(counts.values())
    if len(per) != 1:
        raise PlanError(
            f"{what}: with grouped-query attention ({b.kv_heads} key/value heads, {g} query heads "
            f"each) every surviving group must keep the same number of query heads; kept "
            f"{dict(sorted(counts.items()))} (group: heads)"
        )
    return sorted(counts), per.pop()


def _set_int(module: nn.Module, attrs: Sequence[str], value: int) -> None:
    for attr in attrs:
        if isinstance(getattr(module, attr, None), int):
            setattr(module, attr, value)


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
    # the linears that lose rows or columns (a block keeping everything keeps its codes)
    touched = [
        lin
        for name, b in infos.items()
        for lin in (
            ([b.q, b.k, b.v, b.o] if _loses(heads, name, b.num_heads) else [])
            + ([*b.ffn_inputs(), b.fc2] if _loses(neurons, name, b.ffn) else [])
        )
    ]
    specs = _dequantize(model, list(dict.fromkeys(touched)))
    try:
        _shrink_blocks(model, family, infos, heads, neurons)
    finally:
        _requantize(model, specs)
    return model


def _loses(keep: Mapping[str, Sequence[int]] | None, name: str, n: int) -> bool:
    if not keep or name not in keep:
        return False
    return len({int(i) for i in keep[name]}) < n


def _swap_base(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the innermost layer under ``name`` (wrapped or not) sits."""
    module = model.get_submodule(name)
    if isinstance(module, Wrapper):
        while isinstance(module.base_layer, Wrapper):
            module = module.base_layer
        module.base_layer = new
        return
    set_module(model, name, new)


def _dequantize(model: nn.Module, names: list[str]) -> dict[str, BaseQuant]:
    """Quantized linears among ``names`` become float ones for slicing (see :func:`shrink`)."""
    specs = {}
    for n in names:
        base = unwrap(model.get_submodule(n))
        if is_quantized(base):
            specs[n] = spec_of(base)
            _swap_base(model, n, dequantize_linear(base))
    return specs


def _requantize(model: nn.Module, specs: Mapping[str, BaseQuant]) -> None:
    for n, spec in specs.items():
        base = unwrap(model.get_submodule(n))
        bias = base.bias if isinstance(base.bias, Tensor) else None
        q = quantize_linear(weight_oi(base), bias, spec, transposed=is_transposed(base))
        q.train(base.training)
        _swap_base(model, n, q)


def _shrink_blocks(
    model: nn.Module,
    family: Family,
    infos: Mapping[str, BlockInfo],
    heads: Mapping[str, Sequence[int]] | None,
    neurons: Mapping[str, Sequence[int]] | None,
) -> None:
    assert family.block is not None
    for name, b in infos.items():
        if heads and name in heads:
            keep = _indices(heads[name], b.num_heads, f"{name} heads")
            if len(keep) < b.num_heads:  # a block keeping every head is left as it is
                rows = head_columns(keep, b.head_dim)
                groups, per_group = _kept_groups(keep, b, f"{name} heads")
                kv_rows = head_columns(groups, b.head_dim)
                if b.fused_qkv:  # [q | k | v] thirds of one output
                    width = b.num_heads * b.head_dim
                    _slice_out(model, b.q, torch.cat([rows, rows + width, rows + 2 * width]))
                else:
                    _slice_out(model, b.q, rows)
                    for lin in (b.k, b.v):
                        _slice_out(model, lin, kv_rows)
                _slice_in(model, b.o, rows)
                att = model.get_submodule(b.attention)
                spec = family.block
                _set_int(att, spec.heads_attr, len(keep))
                _set_int(att, spec.width_attrs, len(keep) * b.head_dim)
                if spec.groups_attr:
                    _set_int(att, (spec.groups_attr,), per_group)
        if neurons and name in neurons:
            keep = _indices(neurons[name], b.ffn, f"{name} FFN neurons")
            if len(keep) < b.ffn:
                for lin in b.ffn_inputs():
                    _slice_out(model, lin, keep)
                _slice_in(model, b.fc2, keep)
