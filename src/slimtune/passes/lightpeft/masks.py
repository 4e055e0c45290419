"""Head and FFN-neuron masks, applied by forward pre-hooks on the family's ``o`` and ``fc2``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..blocks import BlockInfo

__all__ = []


class Masks(nn.Module):
    """One mask per head and per FFN neuron of every block, applied by forward pre-hooks."""

    def __init__(self, model: nn.Module, blocks: list[BlockInfo]) -> None:
        super().__init__()
        # the first floating parameter: a quantized base's weights hold integer codes
        p = next(q for q in model.parameters() if q.is_floating_point())
        self.heads = nn.ParameterList(
            [nn.Parameter(torch.ones(b.num_heads, device=p.device, dtype=p.dtype)) for b in blocks]
        )
        self.neurons = nn.ParameterList(
            [nn.Parameter(torch.ones(b.ffn, device=p.device, dtype=p.dtype)) for b in blocks]
        )
        self.handles = []
        for b, mh, mn in zip(blocks, self.heads, self.neurons, strict=True):
            self.handles.append(
                model.get_submodule(b.o).register_forward_pre_hook(_head_hook(mh, b.head_dim))
            )
            self.handles.append(model.get_submodule(b.fc2).register_forward_pre_hook(_ffn_hook(mn)))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def _head_hook(mask: Tensor, head_dim: int) -> Any:
    def hook(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        x = (x.unflatten(-1, (mask.shape[0], head_dim)) * mask[:, None].to(x.dtype)).flatten(-2)
        return (x, *args[1:])

    return hook


def _ffn_hook(mask: Tensor) -> Any:
    def hook(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (args[0] * mask.to(args[0].dtype), *args[1:])

    return hook
