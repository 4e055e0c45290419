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
from ..linear import dims, is_linear
from ..methods.base import unwrap
from ..qbase.layers import logical_shape

__all__ = ["BlockInfo", "block_infos", "head_columns", "layer_params"]


@dataclass(frozen=True)
class BlockInfo:
    """One transformer block: full module names of its linears and its current sizes.

    Attributes:
        name: the block's module name.
        attention: module name owning the head count attributes.
        q, k, v, o, fc1, fc2: full module names of the six linears (possibly wrapped).
        num_heads: current number of attention (query) heads.
        head_dim: size of one head (rows of q/k/v per head).
        ffn: current number of FFN intermediate neurons.
        kv_heads: key/value heads (``num_heads`` without grouped-query attention).
        gate: full name of the gate linear of a gated FFN, or ``None``.
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
    kv_heads: int = 0
    gate: str | None = None

    def __post_init__(self) -> None:
        if self.kv_heads == 0:
            object.__setattr__(self, "kv_heads", self.num_heads)

    @property
    def fused_qkv(self) -> bool:
        """Whether q, k and v are one fused linear (output ``[q | k | v]``)."""
        return self.q == self.k == self.v

    @property
    def group_size(self) -> int:
        """Query heads per key/value head."""
        return self.num_heads // self.kv_heads

    def ffn_inputs(self) -> tuple[str, ...]:
        """The FFN linears whose rows are the neurons (``fc1``, and ``gate`` when gated)."""
        return (self.fc1,) if self.gate is None else (self.gate, self.fc1)


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
        gate = _sub(model, block, spec.gate) if spec.gate else None
        att_name = _sub(model, block, spec.attention)
        att = model.get_submodule(att_name)
        lins = {r: unwrap(model.get_submodule(n)) for r, n in names.items()}
        for r, lin in lins.items():
            if not is_linear(lin):
                raise PlanError(f"{names[r]} is a {type(lin).__name__}, not a linear layer")
        o_in = dims(lins["o"])[0]
        head_dim = getattr(att, spec.head_dim, None) if spec.head_dim else None
        fused = names["q"] == names["k"] == names["v"]
        q_rows = dims(lins["q"])[1] // (3 if fused else 1)
        k_rows = dims(lins["k"])[1] // (3 if fused else 1)
        if spec.heads_attr:
            heads = _heads_of(att, spec.heads_attr, att_name)
            if not isinstance(head_dim, int):
                head_dim = o_in // max(heads, 1)
        elif isinstance(head_dim, int):
            heads = q_rows // head_dim
        else:
            raise PlanError(
                f"{att_name}: the family reads the head count from the shapes, which needs the "
                f"head size attribute {spec.head_dim!r}"
            )
        if heads * head_dim != o_in or q_rows != o_in or k_rows % head_dim:
            raise PlanError(
                f"{att_name}: {heads} heads x {head_dim} does not fit {o_in} inputs of "
                f"{names['o']} and {k_rows} key rows"
            )
        kv = k_rows // head_dim
        if kv < 1 or heads % kv:
            raise PlanError(f"{att_name}: {heads} query heads do not split into {kv} kv groups")
        ffn = dims(lins["fc1"])[1]
        out.append(
            BlockInfo(
                block,
                att_name,
                num_heads=heads,
                head_dim=head_dim,
                ffn=ffn,
                kv_heads=kv,
                gate=gate,
                **names,
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
    """Parameters of the blocks' attention and FFN linears (q, k, v, o, fc1, fc2 and the gate of
    a gated FFN, with biases; a fused qkv counted once).

    This is what Light-PEFT prunes and how its pruned fraction is counted: embeddings, norms,
    the pooler and the head are excluded. LoRA parameters are not counted.
    """
    total = 0
    for b in block_infos(model, family):
        for name in dict.fromkeys((b.q, b.k, b.v, b.o, *b.ffn_inputs(), b.fc2)):
            lin = unwrap(model.get_submodule(name))
            total += sum(logical_shape(p).numel() for p in lin.parameters(recurse=False))
    return total
