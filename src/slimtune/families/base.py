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
        probs_dropout: module applied to the attention probabilities (used to mask heads).
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
        num_heads_config: config attribute names to update after head pruning.
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

    def matches(self, model: nn.Module) -> bool:
        """Whether ``model`` contains a block of this family."""
        return any(type(m).__name__ in self.block_types for m in model.modules())

    def role_names(self, model: nn.Module, role: str) -> list[str]:
        """Module names of ``model`` playing ``role``, in model order."""
        pattern = role_regex(self.roles[role])
        return [n for n, _ in model.named_modules() if n and pattern.fullmatch(n)]

    def block_names(self, model: nn.Module) -> list[str]:
        """Module names of the transformer blocks, in order."""
        pattern = role_regex(self.blocks)
        return [n for n, _ in model.named_modules() if n and pattern.fullmatch(n)]
