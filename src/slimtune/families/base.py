"""Backbone families: one place per architecture that names its parts.

A family maps *roles* (``q``, ``k``, ``v``, ``o``, ``fc1``, ``fc2``, ``norm``, ``embed``,
``head``, ...) to regular expressions over module names, and describes the structure the
passes need: where the transformer blocks are, how many heads each attention has, where the FFN
hidden neurons live, and where prompts may be inserted. Methods and passes ask the family; they
never hard-code module names or sizes.

Role patterns are matched against the *end* of a module name (``(?:.*\\.)?PATTERN``), so a
family also recognises a backbone wrapped inside a larger model (``model.backbone.encoder...``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

__all__ = ["Family", "BlockSpec", "Encoder", "LINEAR_ROLES", "role_regex"]

LINEAR_ROLES: tuple[str, ...] = ("q", "k", "v", "o", "fc1", "fc2")
"""The six linears of a transformer block, by role: attention q, k, v, o and FFN fc1, fc2.

Every family that describes blocks names these roles; passes and benchmarks use this tuple
instead of writing the names out."""


def role_regex(pattern: str) -> re.Pattern[str]:
    """Compile a role pattern so it matches a full module name ending in ``pattern``."""
    return re.compile(rf"(?:.*\.)?(?:{pattern})")


@dataclass(frozen=True)
class Encoder:
    """A stack of transformer blocks into which prompt tokens can be inserted.

    Attributes:
        blocks: pattern of the blocks' module names (one match per block, in order).
        n_special: number of leading special tokens (CLS, class tokens) that prompts go after.
            A string names an attribute of the model's config holding that number.
        strip: remove the prompt tokens after the last block (needed when every output token
            is used downstream, as in dense prediction).
    """

    blocks: str
    n_special: int | str = 1
    strip: bool = True


@dataclass(frozen=True)
class BlockSpec:
    """Where a block's attention heads and FFN neurons live (relative module names).

    Attributes:
        q, k, v: query/key/value linears (output rows grouped by head).
        o: attention output linear (input columns grouped by head).
        attention: the module owning the head count attributes.
        heads_attr: attribute names on ``attention`` (or its config) holding the head count.
        head_dim: attribute holding the head size, or ``None`` to derive it from ``q``.
        fc1, fc2: FFN input/output linears; the FFN neurons are fc1's rows and fc2's columns.
        gate: the gate linear of a gated FFN (``down(act(gate(x)) * up(x))``), whose rows go
            with fc1's (``up``); ``None`` for a plain FFN.
        heads_attr: attributes of the attention holding the query head count, lowered after
            head pruning. Empty: the count is read from the shapes (``q`` rows / head size),
            as for Llama-style attention, which reshapes with ``-1``.
        width_attrs: attributes of the attention holding the width of the concatenated
            heads (``all_head_size``, GPT-2's ``split_size``), set after head pruning.
        groups_attr: attribute holding the query heads per key/value head (grouped-query
            attention), updated after head pruning.

    Grouped-query attention (fewer key/value heads than query heads) is read from the shapes:
    ``k`` rows / head size key/value heads, query head ``h`` using key/value head
    ``h // (heads / kv_heads)``. When ``q``, ``k`` and ``v`` name the same module (a fused
    ``qkv`` linear such as GPT-2's ``c_attn``), its output is ``[q | k | v]`` in equal thirds.
    """

    q: str
    k: str
    v: str
    o: str
    attention: str
    fc1: str
    fc2: str
    heads_attr: tuple[str, ...] = ("num_attention_heads",)
    head_dim: str | None = None
    gate: str | None = None
    width_attrs: tuple[str, ...] = ("all_head_size",)
    groups_attr: str | None = None


@dataclass(frozen=True)
class Family:
    """Description of one backbone family.

    Attributes:
        name: short name (``bert``, ``vit``, ``tsvit``, ``generic``).
        block_types: class names of the transformer blocks identifying the family.
        roles: role -> pattern over module names.
        block: structure of a block for head/neuron pruning, or ``None``.
        encoders: where prompts may go; empty if the family does not support prompts.
        candidate_roles: roles whose weights SPT scores (matrices); vectors are added
            from every norm and bias inside the blocks.
        frozen_roles: roles always kept frozen (embeddings).
        parallel_adapter: roles whose output feeds / receives a parallel adapter.
        extra: named parameters that are not modules (``param:NAME`` targets).
        fused: role -> ``(part, parts)`` for roles that are a slice of a fused linear's output
            (GPT-2's ``c_attn`` is ``[q | k | v]``: ``q`` is part 0 of 3). LoRA on such a role
            updates only those output rows.
        prompt_input: pattern of the module that takes ``input_ids``/``inputs_embeds`` and
            returns hidden states (a decoder stack such as ``LlamaModel``): prompt tokens are
            prepended to its input embeddings (prompt tuning) when the family has no
            ``encoders``.
        structure: relative module names every block of this family has; a model matches the
            family when a module named like ``blocks`` contains all of them (so new
            architectures with the same layout are recognised without listing their classes).
    """

    name: str
    block_types: tuple[str, ...]
    roles: dict[str, str]
    block: BlockSpec | None = None
    blocks: str = ""
    encoders: tuple[Encoder, ...] = ()
    candidate_roles: tuple[str, ...] = LINEAR_ROLES
    frozen_roles: tuple[str, ...] = ("embed",)
    parallel_adapter: tuple[str, str] | None = None
    extra: dict[str, str] = field(default_factory=dict)
    fused: dict[str, tuple[int, int]] = field(default_factory=dict)
    prompt_input: str | None = None
    structure: tuple[str, ...] = ()

    def matches(self, model: nn.Module) -> bool:
        """Whether ``model`` contains a block of this family (by class name, or by structure:
        a module named like :attr:`blocks` that has every module of :attr:`structure`)."""
        if any(type(m).__name__ in self.block_types for m in model.modules()):
            return True
        if not self.structure or not self.blocks:
            return False
        pattern = role_regex(self.blocks)
        for name, block in model.named_modules():
            if name and pattern.fullmatch(name):
                inner = dict(block.named_modules())
                return all(s in inner or f"base_layer.{s}" in inner for s in self.structure)
        return False

    def role_names(self, model: nn.Module, role: str) -> list[str]:
        """Module names of ``model`` playing ``role``, in model order."""
        pattern = role_regex(self.roles[role])
        return [n for n, _ in model.named_modules() if n and pattern.fullmatch(n)]

    def block_names(self, model: nn.Module) -> list[str]:
        """Module names of the transformer blocks, in order."""
        pattern = role_regex(self.blocks)
        return [n for n, _ in model.named_modules() if n and pattern.fullmatch(n)]
