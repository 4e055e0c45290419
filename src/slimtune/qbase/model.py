"""Quantize a model's frozen base (QLoRA-style), undo it, and read what was done.

>>> slimtune.quantize_base(model, bits=4)          # nf4, blocks of 64, double-quantized scales
>>> slimtune.apply(model, [LoRA(r=8, targets=["q", "v"])])

Which layers: every linear inside the family's transformer blocks (attention and FFN). The task
head, ``lm_head`` and norms stay in full precision; the input embeddings too unless
``embeddings=True``. Quantize *before* applying methods; the quantization is read back from the
layers themselves (:func:`base_quant`), so nothing hidden rides on the model.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import PlanError
from ..families import GENERIC, detect_family
from ..methods.base import set_module
from .layers import (
    Int8Embedding,
    dequantize_linear,
    is_quantized,
    logical_shape,
    quantize_linear,
    require_backend,
    spec_of,
)
from .spec import BaseQuant

__all__ = ["base_quant", "base_tensors", "dequantize_base", "quantize_base", "weights_bytes"]


def _targets(model: nn.Module, targets: str | None) -> list[str]:
    from ..linear import is_linear

    if targets is not None:
        pattern = re.compile(targets)
        names = [n for n, m in model.named_modules() if is_linear(m) and pattern.fullmatch(n)]
        if not names:
            raise PlanError(f"targets {targets!r} match no linear layer of this model")
        return names
    family = detect_family(model)
    blocks = family.block_names(model) if family is not GENERIC else []
    if not blocks:
        raise PlanError(
            "quantize_base could not find the transformer blocks of this model (generic family); "
            "pass targets=REGEX naming the linears to quantize"
        )
    prefixes = tuple(b + "." for b in blocks)
    return [n for n, m in model.named_modules() if n.startswith(prefixes) and is_linear(m)]


@torch.no_grad()
def quantize_base(
    model: nn.Module,
    bits: int = 4,
    kind: str | None = None,
    *,
    block_size: int = 64,
    double_quant: bool = True,
    embeddings: bool = False,
    targets: str | None = None,
) -> BaseQuant:
    """Replace the frozen linears of ``model``'s blocks by 4-bit or 8-bit ones, in place.

    Args:
        bits: 4 (``kind`` nf4 or fp4) or 8 (``kind`` int8).
        kind: ``nf4`` (default for 4 bits), ``fp4`` or ``int8``.
        block_size: weights per absmax for 4-bit kinds (bitsandbytes' blocksize).
        double_quant: 4-bit kinds: quantize the absmax values again (QLoRA's default).
        embeddings: also store the input embedding table as int8 rows (not in QLoRA).
        targets: a regular expression over module names to choose the linears yourself.

    Returns:
        The :class:`BaseQuant` applied (also readable later with :func:`base_quant`).

    Raises:
        PlanError: methods already applied, a model already quantized, bad settings, or no
            bitsandbytes.
    """
    spec = BaseQuant.of(
        bits, kind, block_size=block_size, double_quant=double_quant, embeddings=embeddings
    )
    if getattr(model, "_slimtune", None) is not None:
        raise PlanError(
            "quantize the base before applying slimtune methods (apply() was already called)"
        )
    done = base_quant(model)
    if done is not None:
        raise PlanError(f"this model's base is already quantized ({done.describe()})")
    require_backend()
    from ..linear import is_transposed, weight_oi

    names = _targets(model, targets)
    emb = _embedding(model) if embeddings else None
    for name in names:
        lin = model.get_submodule(name)
        bias = lin.bias if isinstance(lin.bias, Tensor) else None
        q = quantize_linear(weight_oi(lin), bias, spec, transposed=is_transposed(lin))
        q.train(lin.training)
        set_module(model, name, q)
        del lin
    if emb is not None:
        name, table = emb
        set_module(model, name, Int8Embedding(table.weight, table.padding_idx))
    _own_storage(model)
    return spec


@torch.no_grad()
def _own_storage(model: nn.Module) -> None:
    """Give every float tensor left its own memory.

    transformers loads a safetensors checkpoint as tensors on one memory map of the file: as
    long as one of them (an embedding, a norm) lives, the map stays, and the pages that
    quantizing read (every replaced linear's float weight) stay resident. Copying the
    survivors (one copy of the float weights that remain) releases it.
    """
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_floating_point():
            t.data = t.data.clone()


def _embedding(model: nn.Module) -> tuple[str, nn.Embedding]:
    get = getattr(model, "get_input_embeddings", None)
    table = get() if callable(get) else None
    if not isinstance(table, nn.Embedding):
        raise PlanError("embeddings=True needs a model with an nn.Embedding input table")
    out = getattr(model, "get_output_embeddings", lambda: None)()
    if out is not None and getattr(out, "weight", None) is table.weight:
        raise PlanError(
            "embeddings=True: this model ties its output layer to the input embeddings "
            "(a causal LM head); int8 embeddings would untie them. Keep embeddings=False"
        )
    for n, m in model.named_modules():
        if m is table:
            return n, table
    raise PlanError("the input embedding table is not a submodule of the model")


def base_tensors(model: nn.Module) -> list[tuple[str, Tensor, torch.Size]]:
    """Every weight of the base as ``(name, stored tensor, logical shape)``: parameters (a
    packed 4-bit weight with the ``[out, in]`` shape it stands for) and int8 embedding tables
    (as ``<name>.weight``), which are buffers."""
    out: list[tuple[str, Tensor, torch.Size]] = [
        (n, p, logical_shape(p)) for n, p in model.named_parameters()
    ]
    for n, m in model.named_modules():
        if isinstance(m, Int8Embedding):
            out.append((f"{n}.weight" if n else "weight", m.codes, m.codes.shape))
    return out


def base_quant(model: nn.Module) -> BaseQuant | None:
    """How ``model``'s base is quantized (read from its layers), or ``None`` for a float base.

    Raises:
        PlanError: layers quantized in different ways (not made by :func:`quantize_base`).
    """
    from ..methods.base import Wrapper

    specs: set[BaseQuant] = set()
    emb = False
    for m in model.modules():
        if isinstance(m, Wrapper) or not is_quantized(m):
            continue
        if isinstance(m, Int8Embedding):
            emb = True
        else:
            specs.add(spec_of(m))
    if not specs:
        return BaseQuant(kind="int8", embeddings=True) if emb else None
    if len(specs) > 1:
        raise PlanError(
            "this model's linears are quantized in several ways: "
            + "; ".join(sorted(s.describe() for s in specs))
        )
    spec = specs.pop()
    return (
        BaseQuant(
            kind=spec.kind,
            block_size=spec.block_size or 64,
            double_quant=spec.double_quant,
            embeddings=emb,
        )
        if spec.kind != "int8"
        else BaseQuant(kind="int8", embeddings=emb)
    )


@torch.no_grad()
def dequantize_base(model: nn.Module) -> int:
    """Replace every quantized layer by a float one holding its dequantized weights, in place.

    Methods applied on top stay (they wrap the new layers), so ``slimtune.merge`` afterwards is
    exact with respect to the weights the adapter was trained against. Returns the number of
    layers replaced.
    """
    from ..methods.base import Wrapper

    done = 0
    for name, m in list(model.named_modules()):
        if not name or isinstance(m, Wrapper) or not is_quantized(m):
            continue
        if isinstance(m, Int8Embedding):
            emb = nn.Embedding(
                m.num_embeddings, m.embedding_dim, m.padding_idx, device=m.codes.device
            )
            emb.weight = nn.Parameter(m.weight, requires_grad=False)
            set_module(model, name, emb)
        else:
            set_module(model, name, dequantize_linear(m))
        done += 1
    return done


def weights_bytes(model: nn.Module) -> dict[str, Any]:
    """Bytes the model's weights take in memory: parameters, buffers and quantization state
    (absmax, nested statistics), each tensor counted once."""
    seen: set[int] = set()
    total = 0

    def add(t: Tensor) -> None:
        nonlocal total
        key = t.data_ptr()
        if key in seen or t.numel() == 0:
            return
        seen.add(key)
        total += t.numel() * t.element_size()

    for t in list(model.parameters()) + list(model.buffers()):
        add(t)
    for m in model.modules():
        w = getattr(m, "weight", None)
        qs = getattr(w, "quant_state", None) if isinstance(w, Tensor) else None
        if qs is not None:
            for v in qs.as_dict(packed=True).values():
                if isinstance(v, Tensor):
                    add(v)
        scb = getattr(w, "SCB", None) if isinstance(w, Tensor) else None
        if isinstance(scb, Tensor):
            add(scb)
    return {"bytes": total, "mb": total / 2**20}
