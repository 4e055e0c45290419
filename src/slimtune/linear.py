"""Linear layers in either storage order: ``nn.Linear`` and GPT-2's ``Conv1D``.

``nn.Linear`` stores its weight as ``[out, in]`` (``y = x W^T + b``); transformers' ``Conv1D``
(GPT-2, GPT-J's ancestors, many older checkpoints) stores the same map as ``[in, out]``
(``y = x W + b``). Methods and passes work on the ``[out, in]`` view :func:`weight_oi` returns
(a view, so in-place updates reach the stored tensor) and on :func:`dims`; nothing else needs
to know which kind a layer is.

Quantized linears (a 4-bit or 8-bit frozen base, :mod:`slimtune.qbase`) are linears too: their
:func:`dims` are the logical ones and :func:`weight_oi` returns the dequantized weight (a new
tensor: writing into it changes nothing, so merging onto them is refused elsewhere).
"""

from __future__ import annotations

from functools import cache

import torch
from torch import Tensor, nn

__all__ = ["linear_types", "is_linear", "is_transposed", "dims", "weight_oi", "float_dtype"]


@cache
def linear_types() -> tuple[type[nn.Module], ...]:
    """``nn.Linear`` and, when transformers is importable, its ``Conv1D``."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # the library works without transformers' models
        return (nn.Linear,)
    return (nn.Linear, Conv1D)


def is_transposed(module: nn.Module) -> bool:
    """Whether ``module`` stores its weight as ``[in, out]`` (a ``Conv1D``)."""
    return not isinstance(module, nn.Linear) and isinstance(module, linear_types())


def is_linear(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.Linear`` or a ``Conv1D``."""
    return isinstance(module, linear_types())


def dims(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear layer of either kind."""
    from .qbase.layers import is_quantized

    if is_quantized(module):
        return int(module.in_features), int(module.out_features)  # type: ignore[arg-type]
    w = module.weight
    assert isinstance(w, Tensor)
    return (w.shape[0], w.shape[1]) if is_transposed(module) else (w.shape[1], w.shape[0])


def weight_oi(module: nn.Module) -> Tensor:
    """The weight as ``[out, in]`` (a transposed view for ``Conv1D``; the dequantized weight,
    a copy, for a quantized linear)."""
    from .qbase.layers import dequantized_weight, is_quantized

    if is_quantized(module):
        return dequantized_weight(module)
    w = module.weight
    assert isinstance(w, Tensor)
    return w.t() if is_transposed(module) else w


def float_dtype(module: nn.Module) -> torch.dtype:
    """The floating dtype a linear computes in (its weight's, or a quantized layer's compute
    dtype), for new tensors that go with it (biases, LoRA matrices)."""
    w = module.weight
    assert isinstance(w, Tensor)
    if w.is_floating_point():
        return w.dtype
    dt = getattr(module, "compute_dtype", None)
    if isinstance(dt, torch.dtype):
        return dt
    b = getattr(module, "bias", None)
    return b.dtype if isinstance(b, Tensor) else torch.float32
