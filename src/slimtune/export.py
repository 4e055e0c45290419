"""Export to Hugging Face peft's LoRA format, and to a plain merged model."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from .core import get_state, remove, wrappers
from .errors import ExportError
from .io import atomic_write, atomic_write_text
from .linear import is_transposed, linear_types
from .methods.head import QuantizedHead
from .methods.lora import LoRALinear
from .methods.lora_conv import LoRAConv2d
from .qbase import dequantize_base

__all__ = ["export_peft", "merged_state_dict"]


def _task_type(model: nn.Module) -> str | None:
    """peft's task type for a Hugging Face model class (``None`` for other models)."""
    name = type(model).__name__
    for suffix, task in (
        ("ForSequenceClassification", "SEQ_CLS"),
        ("ForCausalLM", "CAUSAL_LM"),
        ("ForTokenClassification", "TOKEN_CLS"),
        ("ForQuestionAnswering", "QUESTION_ANS"),
    ):
        if name.endswith(suffix):
            return task
    return None


def export_peft(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` loadable by peft.

    Only LoRA on linear and 2-D convolution layers (with a trainable head as ``modules_to_save``) has a peft
    equivalent; any other method raises :class:`ExportError`. Quantized LoRA matrices and a
    quantized head (Bi-Head, a plain ``modules_to_save`` linear in peft) are written
    de-quantized; a head whose bias was dropped gets a zero bias. Different ranks/alphas go to ``rank_pattern`` / ``alpha_pattern``.
    """
    from .passes.base_pruning import pruning_of

    if pruning_of(model) is not None:
        raise ExportError(
            "this model is pruned (Light-PEFT or a composition): peft applies an adapter to the "
            "unpruned base, whose shapes differ; export the merged model instead (a pruned "
            "backbone folder, slimtune.io.load_pruned) or keep the task file (slimtune.save)"
        )
    state = get_state(model)
    others = sorted({e.method for e in state.plan.entries} - {"lora", "head"})
    if others:
        raise ExportError(
            f"peft has no equivalent for {', '.join(others)}: only LoRA (plus the head) can be exported "
            "to peft's format; use the merged export or slimtune.save instead"
        )
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    dropouts = set()
    kinds: set[bool] = set()  # Conv1D (fan_in_fan_out) or not
    for name, w in wrappers(model):
        if not isinstance(w, (LoRALinear, LoRAConv2d)):
            continue
        if not isinstance(w.base_layer, (*linear_types(), nn.Conv2d)):
            raise ExportError(f"{name}: LoRA stacked on another method cannot be exported to peft")
        a, b = w.weights()
        if isinstance(w, LoRALinear):
            b = w.full_b()  # peft has no partial rows: zeros outside the fused parts
        kinds.add(is_transposed(w.base_layer))
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.detach().float().cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.detach().float().cpu().contiguous()
        ranks[name] = w.r
        alphas[name] = w.alpha
        dropouts.add(w.dropout)
    if not ranks:
        raise ExportError("the model has no LoRA layers to export")
    for head in state.plan.head:
        for pname, p in model.get_submodule(head).named_parameters():
            tensors[f"base_model.model.{head}.{pname}"] = p.detach().float().cpu().contiguous()
        for sub, m in model.get_submodule(head).named_modules():
            if isinstance(m, QuantizedHead):
                prefix = f"base_model.model.{head}{'.' + sub if sub else ''}"
                tensors.pop(f"{prefix}.base_layer.weight")
                tensors.pop(f"{prefix}.base_layer.bias", None)
                tensors[f"{prefix}.weight"] = m.quantized_weight().detach().float().cpu()
                bias = m.base_layer.bias
                if bias is not None:
                    kept = bias.detach() if m.use_bias else torch.zeros_like(bias)
                    tensors[f"{prefix}.bias"] = kept.float().cpu().contiguous()
    if len(kinds) > 1:
        raise ExportError(
            "LoRA on both Conv1D and nn.Linear layers cannot be exported to one peft config "
            "(peft's fan_in_fan_out is a single setting)"
        )
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": _task_type(model),
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None)
        or None,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": max(dropouts),
        "target_modules": sorted(ranks),
        # peft matches pattern keys with ``re.match(rf"(.*\.)?({key})$", module_name)``: an
        # anchored, escaped full name selects exactly that module.
        "rank_pattern": {f"^{re.escape(k)}$": v for k, v in ranks.items() if v != r},
        "alpha_pattern": {f"^{re.escape(k)}$": v for k, v in alphas.items() if v != alpha},
        "modules_to_save": list(state.plan.head) or None,
        "bias": "none",
        "fan_in_fan_out": kinds == {True},
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(
        out / "adapter_model.safetensors",
        lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}),
    )
    atomic_write_text(out / "adapter_config.json", json.dumps(config, indent=1))
    return out


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict with LoRA/sparse/BitFit/full updates (and a quantized
    head's de-quantized weight) folded in.

    The model itself is left unchanged. Adapters and prompts cannot be folded into the base
    weights and raise :class:`ExportError`. A quantized base (:func:`slimtune.quantize_base`)
    is dequantized in the copy first: the result holds float weights (the dequantized ones
    plus the folded updates, in the original layouts such as GPT-2's ``Conv1D``), never codes.
    """
    import copy

    state = get_state(model)
    bad = sorted(
        {e.method for e in state.plan.entries} - {"lora", "sparse", "bitfit", "full", "head"}
    )
    if bad:
        raise ExportError(
            f"{', '.join(bad)} cannot be merged into the base weights; export with slimtune.save"
        )
    if state.added_biases:
        raise ExportError(
            f"BitFit added biases to {len(state.added_biases)} layers that have none "
            f"({state.added_biases[0]}, ...): the base architecture cannot hold them, so a merged "
            "state dict would silently drop them; export with slimtune.save instead"
        )
    clone = copy.deepcopy(model)
    dequantize_base(clone)
    for _, w in wrappers(clone):
        if w.mergeable:
            w.merge()
    for _, w in wrappers(clone):
        w.merged = False  # keep the folded weights when unwrapping
    remove(clone)
    return {k: v.detach().cpu().contiguous() for k, v in clone.state_dict().items()}
