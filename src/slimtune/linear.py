"""Linear layers in either storage order: ``nn.Linear`` and GPT-2's ``Conv1D``.

``nn.Linear`` stores its weight as ``[out, in]`` (``y = x W^T + b``); transformers' ``Conv1D``
(GPT-2, GPT-J's ancestors, many older checkpoints) stores the same map as ``[in, out]``
(``y = x W + b``). Methods and passes work on the ``[out, in]`` view :func:`weight_oi` returns
(a view, so in-place updates reach the stored tensor) and on :func:`dims`; nothing else needs
to know which kind a layer is.
"""

from __future__ import annotations

from functools import cache

from torch import Tensor, nn

__all__ = ["linear_types", "is_linear", "is_transposed", "dims", "weight_oi"]


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
    w = module.weight
    assert isinstance(w, Tensor)
    return (w.shape[0], w.shape[1]) if is_transposed(module) else (w.shape[1], w.shape[0])


def weight_oi(module: nn.Module) -> Tensor:
    """The weight as ``[out, in]`` (a transposed view for ``Conv1D``)."""
    w = module.weight
    assert isinstance(w, Tensor)
    return w.t() if is_transposed(module) else w
