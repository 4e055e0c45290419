"""Hugging Face ``Trainer`` with slimtune methods: checkpoints hold the adapter only.

>>> from slimtune.integrations.transformers import SlimtuneTrainer
>>> slimtune.apply(model, LoRA(r=8, targets=["q", "v"]))
>>> trainer = SlimtuneTrainer(model=model, args=TrainingArguments(...), train_dataset=...)
>>> trainer.train()                                   # checkpoint-N/ = slimtune.json + adapter
>>> trainer.train(resume_from_checkpoint=True)        # exact resume (tensors restored in place)
>>> trainer.save_model("out")                         # a slimtune adapter: slimtune.load(base, "out")

A plain ``Trainer`` saves the whole model through ``save_pretrained`` (the frozen base again
in every checkpoint, under wrapper names such as ``query.base_layer.weight`` that
``from_pretrained`` does not know). :class:`SlimtuneTrainer` replaces the three places where
the Trainer writes or reads model weights: ``_save`` writes :func:`slimtune.save` (and the
tokenizer or processor, and the training arguments as JSON instead of a pickle),
``_load_from_checkpoint`` and ``_load_best_model`` put the saved tensors back into the running
model with :func:`slimtune.io.adapter.restore`. Optimizer, scheduler and RNG states are the
Trainer's own files, unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn
from transformers import Trainer

from ..core import get_state
from ..io import atomic_write_text
from ..io.adapter import restore, save

__all__ = ["SlimtuneTrainer"]


class SlimtuneTrainer(Trainer):
    """A ``transformers.Trainer`` for a model with slimtune methods applied."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        get_state(self.accelerator.unwrap_model(self.model))  # a clear error if none applied

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:  # type: ignore[type-arg]
        if not self.args.should_save:
            return
        out = Path(output_dir or str(self.args.output_dir))
        save(self.accelerator.unwrap_model(self.model), out)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(str(out))
        atomic_write_text(out / "training_args.json", self.args.to_json_string())

    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: nn.Module | None = None
    ) -> None:
        restore(self.accelerator.unwrap_model(model or self.model), resume_from_checkpoint)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best is not None and os.path.isdir(best):
            restore(self.accelerator.unwrap_model(self.model), best)
