"""Transformer blocks as the passes see them: the six linears of each block and its sizes.

A block's structure comes from its family's :class:`~slimtune.families.BlockSpec`: which
linears are q, k, v, o (the attention) and fc1, fc2 (the FFN), which module holds the head count,
and the head size. :func:`block_infos` resolves them on a model (looking through wrappers);
:func:`layer_params` counts what Light-PEFT prunes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core import family_of
from ..errors import PlanError
from ..families import LINEAR_ROLES, Family
from ..methods.base import unwrap

__all__ = ["BlockInfo", "block_infos", "head_columns", "layer_params"]


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
    family = family or family_of(model)
    spec = family.block
    if spec is None:
        raise PlanError(
            f"the {family.name} family describes no block structure (BlockSpec): "
            "head and neuron pruning needs a known backbone family (bert, vit, tsvit)"
        )
    out = []
    for block in family.block_names(model):
        names = {r: _sub(model, block, getattr(spec, r)) for r in LINEAR_ROLES}
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


def head_columns(heads: Sequence[int] | Tensor, head_dim: int) -> Tensor:
    """The positions of ``heads`` in an attention layer's concatenated head outputs (the rows
    of q, k, v and the input columns of o), head by head."""
    idx = torch.as_tensor(heads, dtype=torch.long).reshape(-1)
    return (idx[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


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
