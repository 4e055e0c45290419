"""Dropout whose masks are cheap to draw on CPU, for the backbone as well as for LoRA.

On CPU, ``torch.nn.functional.dropout`` draws its mask with ``bernoulli_``: one call of the
serial Mersenne-Twister generator per element, single-threaded. In a BERT-like model in
training, that is a large share of the step (MiniLM, batch 32 x 128 tokens, 2 threads: about
40%), and it is also what keeps ``scaled_dot_product_attention`` off its fused CPU kernel
(dropout on the attention probabilities sends it to the unfused math path).
:func:`drop_mask` draws 16 random bits per position from 64-bit draws instead (four positions
per generator call): the same Bernoulli distribution with ``p`` rounded to a multiple of
``2**-16``.

:func:`use_fast_dropout` puts it into a model without editing its code:

* every ``nn.Dropout`` becomes a :class:`FastDropout` (a subclass: ``p``, ``inplace`` and
  ``isinstance`` checks stay as they were);
* a Hugging Face model whose attention is ``sdpa`` through ``AttentionInterface`` (BERT-like
  models, ViT, DINOv2, ...) gets the attention function :func:`fast_dropout_attention` under the name
  :data:`ATTENTION`: in training on CPU with dropout it computes attention with a fast mask;
  otherwise (evaluation, no dropout, CUDA, causal or grouped-query attention) it is the
  ``sdpa`` function unchanged.

Evaluation outputs are the same as before (dropout is off there); only the random stream of
training differs. On CUDA nothing changes (the fused kernels draw masks cheaply). Only models
with attention dropout gain in attention: BERT-like checkpoints have 0.1; ViT and DINOv2
checkpoints have 0 (their ``nn.Dropout`` modules are replaced all the same).

The attention function is registered with transformers when :func:`use_fast_dropout` runs and
when this module is imported after transformers; a model switched to it and then pickled (not
a format slimtune uses) needs ``import slimtune.dropout`` before it runs elsewhere.
"""

from __future__ import annotations

import math
import sys
from typing import Any, cast

import torch
from torch import Tensor, nn

__all__ = ["ATTENTION", "FastDropout", "drop_mask", "fast_dropout_attention", "use_fast_dropout"]

ATTENTION = "slimtune_sdpa"
"""Name under which :func:`fast_dropout_attention` is registered with ``AttentionInterface``."""


def drop_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device) -> Tensor:
    """A ``bool`` tensor of dropped positions, each dropped with probability ``p``.

    On CPU, where the Mersenne-Twister generator is serial and ``torch.rand`` spends one call
    per element, 64-bit draws are split into four uniform 16-bit integers: ``p`` is then
    rounded to a multiple of ``2**-16`` (an error below ``8e-6``). Elsewhere (CUDA's counter-based
    generator is cheap) it is ``torch.rand(shape) < p``. Both follow ``torch.manual_seed``.
    """
    if device.type != "cpu":
        return torch.rand(shape, device=device) < p
    n = math.prod(shape)
    draws = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None)
    threshold = round(p * 65536) - 32768
    return (draws.view(torch.int16)[:n] < threshold).reshape(shape)


class FastDropout(nn.Dropout):
    """``nn.Dropout`` drawing its mask with :func:`drop_mask` on CPU (elsewhere: unchanged)."""

    def forward(self, input: Tensor) -> Tensor:
        if not self.training or not 0.0 < self.p < 1.0 or input.device.type != "cpu":
            return super().forward(input)
        mask = drop_mask(input.shape, self.p, input.device)
        scale = 1.0 / (1.0 - self.p)
        if self.inplace:
            return input.masked_fill_(mask, 0.0).mul_(scale)
        return input.masked_fill(mask, 0.0).mul_(scale)


def fast_dropout_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """Hugging Face attention function: softmax attention with :func:`drop_mask` dropout.

    Takes the fast path only where it computes the same function as ``sdpa`` (training on CPU,
    ``dropout > 0``, not causal, as many key/value heads as query heads, no other argument
    set, such as a head mask or a sliding window); everything else is handed to transformers' ``sdpa`` function.
    Returns ``([batch, queries, heads, head_dim], None)`` as the ``sdpa`` function does.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal  # as sdpa
    harmless = {"is_causal", "position_ids", "output_attentions"}
    extra = [k for k, v in kwargs.items() if v is not None and k not in harmless]
    fast = (
        0.0 < dropout < 1.0
        and module.training
        and query.device.type == "cpu"
        and not causal
        and not extra
        and key.shape[1] == query.shape[1]
        and (attention_mask is None or attention_mask.dim() == 4)
    )
    if not fast:
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            **kwargs,
        )
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query * scale, key.transpose(-1, -2))  # scaling the smaller side
    empty_rows = None
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
            attends = attention_mask.any(dim=-1, keepdim=True)
            empty_rows = None if bool(attends.all()) else ~attends
        else:
            scores = scores + attention_mask.to(scores.dtype)
    probs = torch.softmax(scores, dim=-1)
    if empty_rows is not None:  # a query that may attend to nothing gets zeros, as in sdpa
        probs = probs.masked_fill(empty_rows, 0.0)
    probs = probs.masked_fill(drop_mask(probs.shape, dropout, probs.device), 0.0)
    out = torch.matmul(probs, value).mul_(1.0 / (1.0 - dropout))
    return out.transpose(1, 2).contiguous(), None


def _register_attention() -> bool:
    """Register :func:`fast_dropout_attention` with transformers, with the masks of ``sdpa``
    (``False``: transformers is too old to have these interfaces)."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:  # pragma: no cover - transformers >= 4.48 has both
        return False
    AttentionInterface.register(ATTENTION, fast_dropout_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    return True


if "transformers" in sys.modules:  # cheap here; otherwise registered on first use
    _register_attention()


def use_fast_dropout(model: nn.Module) -> dict[str, int]:
    """Give ``model`` cheap dropout masks on CPU (see the module docstring); in place.

    Returns:
        ``{"modules": n, "attention": m}``: how many ``nn.Dropout`` modules were replaced and
        how many Hugging Face models (``model`` itself or models inside it) now use
        :data:`ATTENTION` (those whose attention is ``sdpa`` through ``AttentionInterface``).
    """
    replaced = 0
    for module in model.modules():
        if type(module) is nn.Dropout:
            # the same object, another class: mode, hooks and shared references stay as they are
            module.__class__ = FastDropout
            replaced += 1
    switched = 0
    handled: set[int] = set()
    for module in model.modules():  # outermost first; a switch covers the submodels
        config = getattr(module, "config", None)
        can_set = getattr(module, "_can_set_attn_implementation", None)
        if config is None or id(config) in handled or not callable(can_set):
            continue
        if getattr(config, "_attn_implementation", None) != "sdpa" or not can_set():
            continue
        if not _register_attention():
            break
        cast(Any, module).set_attn_implementation(ATTENTION)
        handled.update(id(m.config) for m in module.modules() if hasattr(m, "config"))
        switched += 1
    return {"modules": replaced, "attention": switched}
