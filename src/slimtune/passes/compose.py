"""The passes in one chain: prune, then allocate on the pruned model, then keep few bits.

::

    from slimtune.passes.compose import Allocate, Bits, Prune, compose

    model = compose(model, train_loader, [
        Prune(LightPEFTConfig(head_ratio=0.5, ffn_ratio=0.5), steps=100, lr=1e-3),
        Allocate(SPTConfig(budget=64_000, structured="lora", unstructured=False)),
        Bits(1, head_bits=4),
    ])
    ...train the model with any loop...
    slimtune.save(model, "task")   # kept heads/neurons as bits + 1-bit LoRA + 4-bit head
    slimtune.load(original_base, "task")   # the same model again

Each stage is optional; the order is fixed by what each needs: pruning removes heads and neurons
of a plain base (the early phase's LoRA is dropped afterwards, its trained head kept), so it comes
first; the allocation scores the model it is given, so it comes after pruning; bits quantize what
the allocation chose, so they need it before them. Any other order is refused with the reason. A
run config with ``pruning``, ``allocation`` and ``bits`` runs the same chain
(:func:`slimtune.app.loop.train`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..core import apply, apply_plan, quantized_head, remove, wrappers
from ..errors import PlanError
from ..losses import task_loss
from ..methods.lora import LoRALinear
from ..plan import Plan
from .lightpeft import LightPEFTConfig, prune
from .lightpeft.early import early_phase
from .spt import SPTConfig, allocate, sensitivity

__all__ = [
    "Allocate",
    "Bits",
    "Prune",
    "check_order",
    "compose",
    "early_lora",
    "warm_start",
]


@dataclass
class Prune:
    """Light-PEFT's early phase (``steps`` steps of LoRA, head and masks), then its pruning of
    heads and FFN neurons (every LoRA rank kept: the allocation decides the methods)."""

    config: LightPEFTConfig
    steps: int = 100
    lr: float = 1e-3
    weight_decay: float = 1e-4
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.config, LightPEFTConfig):
            raise PlanError(f"Prune needs a LightPEFTConfig, got {type(self.config).__name__}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise PlanError(f"Prune.steps must be a positive integer, got {self.steps!r}")


@dataclass
class Allocate:
    """SPT on the model as it is when the stage runs (pruned, after :class:`Prune`).

    ``warm_start`` (slimtune's, beyond the papers): LoRA modules the allocation places on a
    linear that the early phase trained LoRA on start from those trained matrices
    (:func:`warm_start`) instead of from scratch.
    """

    config: SPTConfig
    batches: int | None = None
    warm_start: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.config, SPTConfig):
            raise PlanError(f"Allocate needs an SPTConfig, got {type(self.config).__name__}")


@dataclass
class Bits:
    """The precision of what the allocation chose (1 to 8, 32 = float) and of the head."""

    bits: int = 1
    head_bits: int = 32

    def __post_init__(self) -> None:
        for name in ("bits", "head_bits"):
            v = getattr(self, name)
            if isinstance(v, bool) or v not in (1, 2, 3, 4, 5, 6, 7, 8, 32):
                raise PlanError(f"Bits.{name} must be 1 to 8 or 32, got {v!r}")
        if self.head_bits not in (1, 2, 4, 8, 32):
            raise PlanError(f"Bits.head_bits must be 1, 2, 4, 8 or 32, got {self.head_bits}")


Stage = Prune | Allocate | Bits
_RANK = {Prune: 0, Allocate: 1, Bits: 2}
_WHY = {
    (Allocate, Prune): "pruning removes heads and neurons of a plain base; prune before allocating "
    "(the allocation is then scored on the pruned model)",
    (Bits, Prune): "bits quantize what the allocation chose; prune first",
    (Bits, Allocate): "bits quantize what the allocation chose; allocate before the bits",
}


def check_order(stages: Sequence[Any]) -> list[Stage]:
    """The stages, checked: known kinds, each at most once, in an order that makes sense.

    Raises:
        PlanError: naming the stage and why it cannot come there.
    """
    out: list[Stage] = []
    for i, st in enumerate(stages):
        if type(st) not in _RANK:
            raise PlanError(
                f"stage {i} is a {type(st).__name__}; a chain takes Prune, Allocate and Bits"
            )
        if any(type(o) is type(st) for o in out):
            raise PlanError(f"stage {i}: {type(st).__name__} appears twice")
        for o in out:
            if _RANK[type(o)] > _RANK[type(st)]:
                why = _WHY[(type(o), type(st))]
                raise PlanError(f"stage {i}: {type(st).__name__} after {type(o).__name__}: {why}")
        out.append(st)
    kinds = {type(s) for s in out}
    if Bits in kinds and Allocate not in kinds:
        raise PlanError(
            "Bits quantize what an Allocate stage chose; without one, give the methods bits "
            "themselves (slimtune.apply(model, [LoRA(bits=1)], head_bits=...))"
        )
    if not out:
        raise PlanError("an empty chain: give Prune, Allocate and/or Bits")
    return out


def compose(
    model: nn.Module,
    batches: Iterable[dict[str, Tensor]],
    stages: Sequence[Any],
    *,
    head: list[str] | None = None,
    loss_fn: Callable[[Any, Tensor], Tensor] | None = None,
) -> nn.Module:
    """Run the chain on a plain base model; returns it with the final plan applied.

    Args:
        model: a plain model (no slimtune methods).
        batches: training batches (dicts of inputs with ``labels``), iterated again as needed
            (the early phase and the sensitivity pass read them).
        stages: :class:`Prune`, :class:`Allocate`, :class:`Bits`, in that order (each optional).
        head: the task head's module names (default: the family's head).
        loss_fn: ``(output, labels) -> loss`` for the early phase (default: cross-entropy).

    Returns:
        ``model``: pruned (its pruning remembered for :func:`slimtune.save`), with the
        allocation's plan at the chosen bits applied, ready to train. Without an
        :class:`Allocate`, a pruned model keeps the early phase's LoRA (Light-PEFT alone).
    """
    chain = check_order(stages)
    if getattr(model, "_slimtune", None) is not None:
        raise PlanError("compose starts from a plain base model: slimtune.remove(model) first")
    by = {type(s): s for s in chain}
    bits = by.get(Bits)
    pr = by.get(Prune)
    if isinstance(pr, Prune):
        apply(model, pr.config.lora(), head=head)
        decision, _ = early_phase(
            model,
            batches,
            pr.config,
            pr.steps,
            lr=pr.lr,
            weight_decay=pr.weight_decay,
            grad_clip=pr.grad_clip,
            loss_fn=loss_fn or task_loss,
        )
        decision.ranks = {n: list(range(r)) for n, r in decision.lora_before.items()}
        prune(model, decision)
        if Allocate in by:
            early = early_lora(model)
            remove(model)  # the pruned base (its record kept) with the early phase's head
    al = by.get(Allocate)
    if isinstance(al, Allocate):
        cfg = al.config
        if isinstance(bits, Bits):
            cfg = dataclasses.replace(cfg, bits=bits.bits)
        scores = sensitivity(model, batches, n_batches=al.batches or cfg.batches)
        plan: Plan = allocate(model, scores, cfg, head=head)
        if isinstance(bits, Bits) and bits.head_bits != 32:
            plan.entries += quantized_head(model, plan, bits.head_bits)
        apply_plan(model, plan)
        if isinstance(pr, Prune) and al.warm_start:
            warm_start(model, early)
    model.train()
    return model


def early_lora(model: nn.Module) -> dict[str, tuple[Tensor, Tensor, float]]:
    """Copies of every LoRA module's ``(A, B, alpha / r)`` by target (the early phase's)."""
    return {
        name: (w.lora_A.detach().clone(), w.lora_B.detach().clone(), float(w.scaling))
        for name, w in wrappers(model)
        if isinstance(w, LoRALinear)
    }


def warm_start(model: nn.Module, early: dict[str, tuple[Tensor, Tensor, float]]) -> list[str]:
    """Start the model's LoRA modules from ``early`` ones on the same linears.

    A module of rank ``r`` takes the ``r`` early ranks with the largest ``|B_i| |A_i|`` (all of
    them when it has as many or more, the rest left as initialised), with ``B`` rescaled so
    that ``scaling * B A`` is the early update. Fused or sliced modules of another shape are
    left alone. Returns the targets that were warm-started.
    """
    done = []
    with torch.no_grad():
        for name, w in wrappers(model):
            if not isinstance(w, LoRALinear) or name not in early:
                continue
            a, b, scale = early[name]
            if a.shape[1] != w.lora_A.shape[1] or b.shape[0] != w.lora_B.shape[0]:
                continue
            k = min(w.lora_A.shape[0], a.shape[0])
            order = (b.norm(dim=0) * a.norm(dim=1)).argsort(descending=True)[:k]
            w.lora_A[:k].copy_(a[order].to(w.lora_A.dtype))
            w.lora_B[:, :k].copy_((b[:, order] * (scale / float(w.scaling))).to(w.lora_B.dtype))
            done.append(name)
    return done
