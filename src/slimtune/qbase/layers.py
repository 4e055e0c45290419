"""Quantized frozen layers: recognise them, read their weights, build them, undo them.

The 4-bit and 8-bit linears are bitsandbytes' ``Linear4bit`` / ``Linear8bitLt`` (subclasses of
``nn.Linear`` whose ``weight`` holds packed codes). Everything else in slimtune reads a linear
through :mod:`slimtune.linear`, which asks this module first, so methods wrap a quantized layer
exactly as they wrap ``nn.Linear``: the layer computes ``x W_q^T + b`` with ``W_q`` the
dequantized weight, and a method adds its update on top.

bitsandbytes' int8 layer (``Linear8bitLt``, no outlier threshold) computes with the dequantized
weight in training mode on CPU, but in eval mode and on CUDA it also quantizes its input to int8
(LLM.int8()): its outputs there differ from ``x W_q^T`` by that input rounding.

The input embedding table can be stored as int8 rows (:class:`Int8Embedding`, slimtune's own:
``E[i] = codes[i] * scale[i] / 127``), an option beyond QLoRA.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import PlanError
from ..linear import float_dtype
from .spec import BaseQuant

__all__ = [
    "Int8Embedding",
    "dequantize_linear",
    "dequantized_weight",
    "is_quantized",
    "load_quantized_state",
    "logical_shape",
    "quantize_linear",
    "refuse_merge",
    "require_backend",
    "spec_of",
]

BACKEND = "bitsandbytes==0.50.2"


def require_backend() -> Any:
    """Import bitsandbytes, or say how to install it."""
    try:
        import bitsandbytes as bnb
    except ImportError as exc:  # pragma: no cover - exercised where bnb is absent
        raise PlanError(
            f"a quantized base needs bitsandbytes: pip install {BACKEND} "
            "(or pip install 'slimtune[qbase]')"
        ) from exc
    return bnb


def _bnb_types() -> tuple[type, ...]:
    bnb = sys.modules.get("bitsandbytes")  # nothing is quantized if bitsandbytes was never imported
    if bnb is None:
        return ()
    return (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a quantized linear (4-bit or 8-bit) or an :class:`Int8Embedding`."""
    return isinstance(module, (*_bnb_types(), Int8Embedding))


def logical_shape(p: Tensor) -> torch.Size:
    """The shape a (possibly packed 4-bit) weight stands for: ``[out, in]`` for ``Params4bit``."""
    qs = getattr(p, "quant_state", None)
    if qs is not None and getattr(qs, "shape", None) is not None:
        return torch.Size(qs.shape)
    return p.shape


def refuse_merge(module: nn.Module, what: str) -> None:
    """Raise if ``module`` is quantized: an update cannot be folded into 4-bit or 8-bit codes
    without re-quantizing (which would change the weights the adapter was trained against)."""
    if is_quantized(module):
        raise PlanError(
            f"cannot merge {what} into a quantized base layer ({spec_of(module).describe()}): "
            "call slimtune.dequantize_base(model) first, then merge (exact with respect to the "
            "dequantized weights), or keep the adapter separate"
        )


def spec_of(module: nn.Module) -> BaseQuant:
    """The :class:`BaseQuant` a quantized linear was built with."""
    bnb = require_backend()
    if isinstance(module, bnb.nn.Linear4bit):
        w = module.weight
        return BaseQuant(
            kind=str(w.quant_type),
            block_size=int(w.blocksize),
            double_quant=bool(w.compress_statistics),
        )
    if isinstance(module, bnb.nn.Linear8bitLt):
        return BaseQuant(kind="int8")
    raise PlanError(f"{type(module).__name__} is not a quantized linear")


@torch.no_grad()
def dequantized_weight(module: nn.Module) -> Tensor:
    """The ``[out, in]`` weight a quantized linear computes with (a new tensor, not a view)."""
    bnb = require_backend()
    w: Any = module.weight
    if isinstance(module, bnb.nn.Linear4bit):
        qs = w.quant_state
        if getattr(qs, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            data, qs = _convert_weight_packed_for_cpu_inverse(w.data, qs)
            w.data, w.quant_state = data, qs
            module.quant_state = qs
        return bnb.functional.dequantize_4bit(w.data, qs).to(float_dtype(module))
    if isinstance(module, bnb.nn.Linear8bitLt):
        scb = w.SCB if getattr(w, "SCB", None) is not None else module.state.SCB
        return (w.data.float() * (scb.float()[:, None] / 127.0)).to(float_dtype(module))
    raise PlanError(f"{type(module).__name__} is not a quantized linear")


@torch.no_grad()
def quantize_linear(
    weight_oi: Tensor, bias: Tensor | None, spec: BaseQuant, *, transposed: bool = False
) -> nn.Module:
    """A bitsandbytes linear computing ``x Q(W)^T + b`` for ``weight_oi`` (``[out, in]``), on the
    weight's device (bitsandbytes quantizes when the layer moves there from the CPU).

    ``transposed``: the float layer was a ``Conv1D`` (``[in, out]`` storage), recorded as the
    layer's ``slimtune_conv1d`` attribute so that :func:`dequantize_linear` gives one back.
    The bias keeps its ``requires_grad`` (a BitFit bias stays trainable).
    """
    bnb = require_backend()
    out_f, in_f = weight_oi.shape
    device, dtype = weight_oi.device, weight_oi.dtype
    if device.type == "meta":
        raise PlanError("cannot quantize a weight on the meta device: load the weights first")
    w = weight_oi.detach().to("cpu", copy=True).contiguous()  # quantized on the way to `device`
    if spec.kind == "int8":
        q: nn.Module = bnb.nn.Linear8bitLt(
            in_f, out_f, bias=bias is not None, has_fp16_weights=False, device="meta"
        )
        q.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
        # the float dtype it computes in (Linear4bit has one too)
        q.compute_dtype = dtype  # type: ignore[assignment]
    else:
        q = bnb.nn.Linear4bit(
            in_f,
            out_f,
            bias=bias is not None,
            compute_dtype=dtype,
            compress_statistics=spec.double_quant,
            quant_type=spec.kind,
            device="meta",
        )
        q.weight = bnb.nn.Params4bit(
            w,
            requires_grad=False,
            quant_type=spec.kind,
            blocksize=spec.block_size,
            compress_statistics=spec.double_quant,
            module=q,
        )
        # On CPUs with avx512_bf16, bitsandbytes repacks 4-bit weights on the first eval-mode
        # forward under no_grad; LoRA then trains on silently zero gradients. Never repack.
        q.support_avx512bf16_for_cpu = False  # type: ignore[assignment]
    if bias is not None:
        q.bias = nn.Parameter(bias.detach().to("cpu", copy=True), requires_grad=bias.requires_grad)
    q.weight.requires_grad_(False)
    q.slimtune_conv1d = transposed  # type: ignore[assignment]
    q = q.to(device)  # bitsandbytes quantizes here
    return q


def load_quantized_state(
    model: nn.Module, tensors: dict[str, Tensor]
) -> tuple[dict[str, Tensor], set[str]]:
    """Put saved quantized weights (codes and quantization state, as ``state_dict`` writes them)
    into ``model``'s 4-bit and 8-bit linears of the same shapes; returns the remaining tensors
    and the names of the tensors loaded.

    ``load_state_dict`` cannot do this (bitsandbytes writes 4-bit state as extra keys that it
    does not read back, and an int8 weight loaded with ``assign`` loses its scales); this is how
    a pruned quantized backbone is reloaded without re-quantizing.
    """
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return tensors, set()
    rest = dict(tensors)
    loaded: set[str] = set()
    for name, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear8bitLt):
            key, scb = f"{name}.weight", f"{name}.SCB"
            if key not in rest or scb not in rest:
                continue
            codes, scales = rest.pop(key), rest.pop(scb)
            rest.pop(f"{name}.weight_format", None)
            if tuple(codes.shape) != (m.out_features, m.in_features) or codes.dtype != torch.int8:
                raise PlanError(
                    f"{key}: saved int8 weight is {tuple(codes.shape)} {codes.dtype}, the layer "
                    f"is {(m.out_features, m.in_features)}"
                )
            device = m.weight.device
            codes, scales = codes.to(device), scales.to(device)
            m.weight = bnb.nn.Int8Params(
                codes, requires_grad=False, has_fp16_weights=False, CB=codes, SCB=scales
            )
            m.state.CB, m.state.SCB = None, None
            loaded.update((key, scb))
            continue
        if not isinstance(m, bnb.nn.Linear4bit):
            continue
        key = f"{name}.weight"
        stats = {k[len(key) + 1 :]: rest.pop(k) for k in list(rest) if k.startswith(key + ".")}
        if key not in rest or not stats:
            continue
        device = m.weight.device
        w = bnb.nn.Params4bit.from_prequantized(
            rest.pop(key), stats, requires_grad=False, device=device, module=m
        )
        if tuple(logical_shape(w)) != (m.out_features, m.in_features):
            raise PlanError(
                f"{key}: saved 4-bit weight is {tuple(logical_shape(w))}, the layer is "
                f"{(m.out_features, m.in_features)}"
            )
        m.weight = w
        m.support_avx512bf16_for_cpu = False
        loaded.add(key)
    return rest, loaded


def dequantize_linear(module: nn.Module) -> nn.Module:
    """A float layer holding a quantized linear's dequantized weight: an ``nn.Linear``, or a
    ``Conv1D`` for one that was a ``Conv1D`` (so a merged state dict loads back into GPT-2).

    Its outputs are those of the quantized layer up to float rounding for 4-bit layers; an
    int8 layer in eval mode (and on CUDA) also quantizes its *input* to int8 (LLM.int8()), which
    the float layer does not.
    """
    w = dequantized_weight(module)
    bias = module.bias if isinstance(module.bias, Tensor) else None
    lin: nn.Module
    if getattr(module, "slimtune_conv1d", False):
        from transformers.pytorch_utils import Conv1D

        lin = Conv1D(w.shape[0], w.shape[1]).to(device=w.device, dtype=w.dtype)
        lin.weight = nn.Parameter(w.t().contiguous(), requires_grad=False)
        if bias is None:
            lin.bias = None
    else:
        lin = nn.Linear(
            w.shape[1], w.shape[0], bias=bias is not None, device=w.device, dtype=w.dtype
        )
        lin.weight = nn.Parameter(w, requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
    lin.train(module.training)
    return lin


class Int8Embedding(nn.Module):
    """An embedding table stored as int8 rows: ``E[i] = codes[i] * scale[i] / 127``.

    Frozen (a buffer, not a parameter). ``weight`` returns the dequantized table for code that
    reads it (e.g. initialising prompt tokens from the vocabulary).
    """

    def __init__(self, weight: Tensor, padding_idx: int | None = None) -> None:
        super().__init__()
        w = weight.detach()
        scale = w.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
        codes = torch.round(w.float() / scale.float()[:, None] * 127).to(torch.int8)
        self.codes: Tensor
        self.scale: Tensor
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale.to(w.dtype))
        self.padding_idx = padding_idx
        self.num_embeddings, self.embedding_dim = w.shape

    @property
    def weight(self) -> Tensor:
        return self.codes.to(self.scale.dtype) * (self.scale[:, None] / 127)

    def forward(self, ids: Tensor) -> Tensor:
        rows = F.embedding(ids, self.codes).to(self.scale.dtype)
        return rows * (F.embedding(ids, self.scale[:, None]) / 127)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 rows"
