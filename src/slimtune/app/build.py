"""Build a run from its config: model by name, task by name, methods (or a pass) applied."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from .. import core
from ..qbase import quantize_base
from .config import ConfigError, RunConfig, build_methods

__all__ = ["Run", "build_model", "build_run", "causal_lm", "set_dropout"]


@dataclass
class Run:
    """A model with its methods applied, the task's data, and the model's info."""

    model: nn.Module
    data: Any
    info: dict[str, Any]


def set_dropout(model: nn.Module, p: float) -> int:
    """Set the probability of every ``nn.Dropout`` in ``model``; returns how many there are.

    Hugging Face BERT-like models route their attention-probability dropout through an
    ``nn.Dropout``'s ``p`` as well, so this covers it. Call it on the plain model, before
    methods are applied (LoRA's own dropout is a setting of the method).
    """
    if not 0.0 <= float(p) < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {p}")
    n = 0
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = float(p)
            n += 1
    return n


def build_model(
    name: str, num_labels: int, dropout: float | None = None, fast_dropout: bool = False
) -> tuple[nn.Module, dict[str, Any]]:
    """A classification model by name: the tiny test models, built-ins, HF ids or folders.

    ``dropout``: if given, the probability of every dropout module of the model
    (:func:`set_dropout`); ``None`` keeps the model's own. ``fast_dropout``: draw the model's
    dropout masks cheaply on CPU (:func:`slimtune.dropout.use_fast_dropout`).
    """
    from ..models.tiny import TINY_MODELS

    if name in TINY_MODELS:
        model, info = TINY_MODELS[name](num_labels)
    else:
        from ..models.loader import load_model

        model, info = load_model(name, num_labels)
    if dropout is not None:
        set_dropout(model, dropout)
    if fast_dropout:
        from ..dropout import use_fast_dropout

        use_fast_dropout(model)
    return model, info


def load_data(cfg: RunConfig, info: dict[str, Any]) -> Any:
    """The run's task, tokenised/resized for its model."""
    from .data.registry import load_task

    tokenizer = None
    if info.get("kind") == "text":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(info["tokenizer"])
    return load_task(
        cfg.task,
        image_size=cfg.data.image_size,
        tokenizer=tokenizer,
        max_length=cfg.data.max_length,
        seed=cfg.train.seed,
        n_train=cfg.data.n_train,
        n_val=cfg.data.n_val,
        n_test=cfg.data.n_test,
    )


def causal_lm(cfg: RunConfig) -> tuple[nn.Module, dict[str, Any], Any]:
    """A causal LM by name (built-in, folder or hub id) and its prompt/response task."""
    from transformers import AutoTokenizer

    from ..models.loader import load_causal_lm
    from .data.decoder import load_lm_task
    from .lm import lm_task_data

    model, info = load_causal_lm(cfg.model)
    if cfg.model_dropout is not None:
        set_dropout(model, cfg.model_dropout)
    if info.get("tokenizer") is None:
        raise ConfigError(f"model {cfg.model!r} has no tokenizer files: a causal-LM run needs one")
    tokenizer = AutoTokenizer.from_pretrained(info["tokenizer"])
    task = load_lm_task(
        cfg.task,
        seed=cfg.train.seed,
        n_train=cfg.data.n_train,
        n_val=cfg.data.n_val,
        n_test=cfg.data.n_test,
    )
    data = lm_task_data(task, tokenizer, cfg.data.max_length)
    info = {**info, "lm_task": task, "tokenizer_object": tokenizer}
    return model, info, data


def quantize_for(cfg: RunConfig, model: nn.Module) -> None:
    """Quantize the frozen base as the run asks (``base_bits``), before any method or pass."""
    spec = cfg.base_quant()
    if spec is not None:
        quantize_base(
            model,
            spec.bits,
            spec.kind,
            block_size=spec.block_size or 64,
            double_quant=spec.double_quant,
        )


def build_run(cfg: RunConfig, *, apply_methods: bool = True) -> Run:
    """Load the model and the task, then apply the configured methods (or SPT allocation).

    The backbone is loaded once: image tasks are loaded first (they need nothing of the model),
    so the model is built with the task's number of classes; text tasks need the model's
    tokenizer, so the model comes first with a 2-way head and is loaded again only for a task
    of another number of classes (no built-in text task has one).
    """
    from .data.registry import task_kind

    if cfg.objective == "causal-lm":
        model, info, data = causal_lm(cfg)
    elif task_kind(cfg.task) == "image":
        data = load_data(cfg, {"kind": "image"})
        model, info = build_model(cfg.model, data.num_classes, cfg.model_dropout, cfg.fast_dropout)
    else:
        model, info = build_model(cfg.model, 2, cfg.model_dropout, cfg.fast_dropout)
        data = load_data(cfg, info)
        if data.num_classes != 2:
            model, info = build_model(
                cfg.model, data.num_classes, cfg.model_dropout, cfg.fast_dropout
            )
    quantize_for(cfg, model)
    if apply_methods:
        if cfg.allocation is not None:
            from .allocate import allocate_run

            allocate_run(model, data, cfg)
        else:
            head = cfg.head if cfg.head is not None or cfg.objective == "classify" else []
            core.apply(model, build_methods(cfg.methods), head=head, head_bits=cfg.head_bits)
    return Run(model=model, data=data, info=info)
