"""Visual prompt tuning (Jia et al., 2022): learnable tokens inserted into a ViT-style encoder.

::

    shallow:  [CLS, P_1..P_L, x_1..x_N] -> block_1 -> ... -> block_D -> drop P
    deep:     a fresh P at every block: block_i sees [CLS, P^i, x]; P^i replaces the previous
              block's prompt outputs

Prompts go after the family's special tokens (CLS, class tokens) and are stripped after the last
block, so the encoder's output keeps its original length.

Decoders (families with a ``prompt_input``, such as Llama, OPT, GPT-2) get prompt tuning at the
input (Lester et al., 2021): :class:`InputPrompt` wraps the decoder stack, prepends the prompt
vectors to the input embeddings, extends the attention mask with ones, and drops the prompt
positions from the hidden states it returns, so logits line up with ``input_ids`` as before.
With a key/value cache (generation), the prompts enter on the first call only and later calls
get their attention mask (and positions) extended. Deep prompts on a decoder would be prefix
key/values, which slimtune does not implement: ``deep=True`` is refused there. Each block is wrapped (kept as
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
from ..linear import dims, is_linear
from ..plan import Plan, PlanEntry
from .base import MethodConfig, Wrapper, get_module, set_module, unwrap
from .registry import register_method

__all__ = ["Prompt", "PromptedBlock", "InputPrompt"]


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
        if not family.encoders and family.prompt_input:
            return self._input_plan(model, family, family.prompt_input)
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

    def _input_plan(self, model: nn.Module, family: Family, pattern: str) -> Plan:
        if self.deep:
            raise PlanError(
                f"deep prompts are not available for the {family.name!r} decoder family (they "
                "would be prefix key/values); use Prompt(deep=False): prompt tuning at the input"
            )
        rx = role_regex(pattern)
        stacks = [n for n, _ in model.named_modules() if n and rx.fullmatch(n)]
        if len(stacks) != 1:
            raise TargetError(
                f"prompt tuning needs exactly one decoder stack matching {pattern!r}, found {stacks}"
            )
        settings = {"length": self.length, "input": True, "init_std": self.init_std}
        return Plan(entries=[PlanEntry("prompt", stacks[0], settings)])


def _width(block: nn.Module) -> int:
    for m in block.modules():
        if isinstance(m, nn.LayerNorm):
            return int(m.normalized_shape[-1])
        if is_linear(m):
            return dims(m)[0]
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
        # the first floating parameter: a quantized base's weights hold integer codes
        p = next(q for q in unwrap(base_layer).parameters() if q.is_floating_point())
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


def _past_length(past: Any) -> int:
    """Tokens already in a key/value cache (0 for ``None`` or an empty cache)."""
    if past is None:
        return 0
    length = getattr(past, "get_seq_length", None)
    if callable(length):
        return int(length())
    return int(past[0][0].shape[-2]) if len(past) else 0


class InputPrompt(Wrapper):
    """A decoder stack whose input embeddings get ``length`` learnable tokens in front."""

    method = "prompt"

    def __init__(self, base_layer: nn.Module, length: int, init_std: float = 0.02) -> None:
        super().__init__(base_layer)
        embed = getattr(base_layer, "get_input_embeddings", None)
        if not callable(embed) or not isinstance(embed(), nn.Module):
            raise TargetError(
                f"{type(base_layer).__name__} has no get_input_embeddings(): prompt tuning at "
                "the input needs a decoder stack that accepts inputs_embeds"
            )
        self.length = length
        w = embed().weight
        self.prompts = nn.Parameter(
            torch.randn(length, w.shape[1], device=w.device, dtype=w.dtype) * init_std
        )

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        if not self.enabled or args:
            return self.base_layer(input_ids, attention_mask, *args, **kwargs)
        n = self.length
        embeds = kwargs.pop("inputs_embeds", None)
        if embeds is None:
            if input_ids is None:
                raise ValueError("InputPrompt needs input_ids or inputs_embeds")
            embed = self.base_layer.get_input_embeddings
            assert callable(embed)
            embeds = embed()(input_ids)
        # transformers 5 passes the key/value cache as ``cache`` (``past_key_values`` before)
        first = _past_length(kwargs.get("cache", kwargs.get("past_key_values"))) == 0
        batch = embeds.shape[0]
        if first:
            p = self.prompts.to(embeds.dtype).expand(batch, n, embeds.shape[-1])
            embeds = torch.cat([p, embeds], dim=1)
        if attention_mask is not None and attention_mask.dim() == 2:
            ones = attention_mask.new_ones(batch, n)
            attention_mask = torch.cat([ones, attention_mask], dim=1)
        for key in ("position_ids", "cache_position"):
            pos = kwargs.get(key)
            if isinstance(pos, Tensor):
                if first:
                    head = torch.arange(n, device=pos.device, dtype=pos.dtype)
                    head = head.expand(*pos.shape[:-1], n)
                    pos = torch.cat([head, pos + n], dim=-1)
                else:
                    pos = pos + n
                kwargs[key] = pos
        out = self.base_layer(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)
        if not first:
            return out
        if isinstance(out, tuple):
            return (out[0][:, n:], *out[1:])
        out.last_hidden_state = out.last_hidden_state[:, n:]
        return out

    def extra_repr(self) -> str:
        return f"length={self.length}, input=True"


@register_method(Prompt, order=5)
def inject_prompt(model: nn.Module, entry: PlanEntry, plan: Plan) -> None:
    s = entry.settings
    block = get_module(model, entry.target)
    if s.get("input"):
        prompted = InputPrompt(block, int(s["length"]), float(s.get("init_std", 0.02)))
        set_module(model, entry.target, prompted)
        return
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
