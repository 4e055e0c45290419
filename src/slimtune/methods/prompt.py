"""Visual prompt tuning (Jia et al., 2022): learnable tokens inserted into a ViT-style encoder.

::

    shallow:  [CLS, P_1..P_L, x_1..x_N] -> block_1 -> ... -> block_D -> drop P
    deep:     a fresh P at every block: block_i sees [CLS, P^i, x]; P^i replaces the previous
              block's prompt outputs

Prompts go after the family's special tokens (CLS, class tokens) and are stripped after the last
block, so the encoder's output keeps its original length. Each block is wrapped (kept as
``base_layer``); nothing is patched. Prompts are not zero-initialised: added tokens change the
attention of every other token, so unlike the other methods a prompted model differs from its
base at initialisation (as in VPT).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import PlanError, TargetError
from ..families import Encoder, Family, role_regex
from ..plan import Plan, PlanEntry
from .base import MethodConfig, Wrapper, get_module, set_module, unwrap
from .registry import register_method

__all__ = ["Prompt", "PromptedBlock"]


@dataclass
class Prompt(MethodConfig):
    """Visual prompt tuning.

    Attributes:
        length: prompt tokens per block (>= 1).
        deep: fresh prompts at every block (VPT-deep) instead of the input only (VPT-shallow).
        encoders: indices of the family's encoders to prompt (``None`` = all; TSViT has a
            temporal (0) and a spatial (1) encoder).
        init_std: standard deviation of the prompts' normal initialisation.
    """

    name = "prompt"
    length: int = 10
    deep: bool = False
    encoders: tuple[int, ...] | list[int] | None = None
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if not isinstance(self.length, int) or self.length < 1:
            raise PlanError(f"Prompt length must be a positive integer, got {self.length!r}")
        if self.encoders is not None:
            self.encoders = tuple(self.encoders)

    def plan(self, model: nn.Module, family: Family) -> Plan:
        if not family.encoders:
            raise TargetError(
                f"prompt tuning is not available for the {family.name!r} family: it needs a "
                "ViT-style encoder without padding masks (families: vit, tsvit)"
            )
        chosen = range(len(family.encoders)) if self.encoders is None else self.encoders
        entries: list[PlanEntry] = []
        for e in chosen:
            if not 0 <= e < len(family.encoders):
                raise PlanError(
                    f"encoder index {e} out of range: {family.name} has {len(family.encoders)} encoders"
                )
            enc: Encoder = family.encoders[e]
            rx = role_regex(enc.blocks)
            blocks = [n for n, _ in model.named_modules() if n and rx.fullmatch(n)]
            if not blocks:
                raise TargetError(f"no blocks match encoder pattern {enc.blocks!r}")
            n_special = (
                enc.n_special
                if isinstance(enc.n_special, int)
                else int(getattr(model.config, enc.n_special))
            )
            for i, name in enumerate(blocks):
                entries.append(
                    PlanEntry(
                        "prompt",
                        name,
                        {
                            "length": self.length,
                            "tokens": i == 0 or bool(self.deep),
                            "insert": i == 0,
                            "strip": enc.strip and i == len(blocks) - 1,
                            "n_special": n_special,
                            "init_std": self.init_std,
                            "encoder": e,
                        },
                    )
                )
        return Plan(entries=entries)


def _width(block: nn.Module) -> int:
    for m in block.modules():
        if isinstance(m, nn.LayerNorm):
            return int(m.normalized_shape[-1])
        if isinstance(m, nn.Linear):
            return m.in_features
    raise TargetError(f"cannot tell the token width of block {type(block).__name__}")


class PromptedBlock(Wrapper):
    """A transformer block that inserts, replaces and/or strips prompt tokens."""

    method = "prompt"

    def __init__(
        self,
        base_layer: nn.Module,
        length: int,
        *,
        tokens: bool,
        insert: bool,
        strip: bool,
        n_special: int,
        init_std: float = 0.02,
    ) -> None:
        super().__init__(base_layer)
        self.length = length
        self.insert = insert
        self.strip = strip
        self.n_special = n_special
        p = next(unwrap(base_layer).parameters())
        self.prompts: nn.Parameter | None = None
        if tokens:
            self.prompts = nn.Parameter(
                torch.randn(length, _width(base_layer), device=p.device, dtype=p.dtype) * init_std
            )

    def forward(self, hidden: Tensor, *args: Any, **kwargs: Any) -> Any:
        if not self.enabled:
            return self.base_layer(hidden, *args, **kwargs)
        ns, n = self.n_special, self.length
        if self.prompts is not None:
            p = self.prompts.to(hidden.dtype).expand(*hidden.shape[:-2], n, hidden.shape[-1])
            rest = hidden[..., ns:, :] if self.insert else hidden[..., ns + n :, :]
            hidden = torch.cat([hidden[..., :ns, :], p, rest], dim=-2)
        out = self.base_layer(hidden, *args, **kwargs)
        if not self.strip:
            return out
        h = out[0] if isinstance(out, tuple) else out
        h = torch.cat([h[..., :ns, :], h[..., ns + n :, :]], dim=-2)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    def extra_repr(self) -> str:
        return f"length={self.length}, tokens={self.prompts is not None}, insert={self.insert}, strip={self.strip}"


@register_method(Prompt, order=5)
def inject_prompt(model: nn.Module, entry: PlanEntry, plan: Plan) -> None:
    s = entry.settings
    block = get_module(model, entry.target)
    set_module(
        model,
        entry.target,
        PromptedBlock(
            block,
            int(s["length"]),
            tokens=bool(s["tokens"]),
            insert=bool(s["insert"]),
            strip=bool(s["strip"]),
            n_special=int(s["n_special"]),
            init_std=float(s.get("init_std", 0.02)),
        ),
    )
