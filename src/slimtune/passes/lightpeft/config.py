"""Settings of the Light-PEFT pass (:class:`LightPEFTConfig`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...errors import PlanError, finite
from ...families import LINEAR_ROLES
from ...methods.lora import LoRA

__all__ = ["SIX", "BACKBONE_SCORES", "GQA_MODES", "LightPEFTConfig"]


SIX = LINEAR_ROLES
"""The six linears of a block, the default targets of the early phase's LoRA."""


BACKBONE_SCORES = ("mask", "taylor", "random")
GQA_MODES = ("groups", "heads")


@dataclass
class LightPEFTConfig:
    """Light-PEFT settings (the paper's defaults).

    Attributes:
        method: always ``light-peft`` (the key that selects this pass in a run config).
        early_steps: length of the early phase: optimizer steps (an int >= 1) or a fraction of
            the run's total steps (a float in (0, 1)).
        head_ratio: fraction of each block's heads removed, rounded down per block
            (``floor(head_ratio * heads)``: with 12 heads, 1/3 and 0.4 both remove 4; 5 need
            at least 5/12). The same rounding applies to every count below.
        ffn_ratio: fraction of all FFN neurons removed (global quantile).
        module_ratio: fraction of all LoRA modules removed (global, by module importance).
        rank_ratio: fraction of the remaining LoRA ranks removed (global, by rank importance).
        l1: L1 penalty weight ``lambda`` on the masks.
        mask_lr: learning rate of the masks (``None``: the run's learning rate).
        r: LoRA rank in the early phase.
        alpha: LoRA scaling numerator.
        dropout: LoRA dropout.
        targets: LoRA targets of the early phase (roles or regexes).
        backbone_score: what ranks the heads and FFN neurons: ``"mask"`` (the paper's: the
            trained mask values); ``"taylor"`` (an option beyond the paper: the first-order
            estimate of the task loss change when a head or neuron is removed,
            ``|m dL_task/dm|``, averaged over the second half of the early phase like the rank
            importance; the masks are trained either way); ``"random"`` (a control: uniform
            random scores drawn from ``torch.initial_seed()``, so a seeded run repeats them).
        rescore_steps: an option beyond the paper (0, the paper's: off): after the early phase,
            prune the backbone only, train LoRA on all its modules for this many more steps
            (an int, or a float in (0, 1): a fraction of the run) and take the module and rank
            importance from those steps' second half, measured on the pruned backbone.
        compensate: an option beyond the paper (``False``, the paper's: off): add the removed
            heads' and neurons' mean contribution to the biases of ``o`` and ``fc2`` (see the
            module docstring); needs biases on both.
        gqa: how heads go under grouped-query attention (the paper's models, BERT/RoBERTa/OPT,
            have none, and there both give the paper's per-head pruning): ``"groups"`` (default)
            removes whole key/value groups, ranked by the summed scores of their query heads,
            ``floor(head_ratio * kv_heads)`` per block: what survives is an ordinary GQA layer
            whose query heads keep their own key/value head, and k and v shrink too (their
            compute goes with the heads); ``"heads"`` removes ``floor(head_ratio * G)`` query
            heads in every group (the lowest of each group), keeping every key/value head: finer
            when there are few groups. Both keep the same number of query heads per surviving
            group, which grouped-query attention needs.
    """

    method: str = "light-peft"
    early_steps: int | float = 0.1
    head_ratio: float = 1 / 3
    ffn_ratio: float = 1 / 3
    module_ratio: float = 0.75
    rank_ratio: float = 0.5
    l1: float = 1e-4
    mask_lr: float | None = None
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] | list[str] = SIX
    backbone_score: str = "mask"
    rescore_steps: int | float = 0
    compensate: bool = False
    gqa: str = "groups"

    def __post_init__(self) -> None:
        if self.gqa not in GQA_MODES:
            raise PlanError(f"gqa must be one of {', '.join(GQA_MODES)}, got {self.gqa!r}")
        if self.method != "light-peft":
            raise PlanError(f"pruning method must be 'light-peft', got {self.method!r}")
        _check_steps("early_steps", self.early_steps, minimum=1)
        _check_steps("rescore_steps", self.rescore_steps, minimum=0)
        for name in ("head_ratio", "ffn_ratio", "module_ratio", "rank_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
                raise PlanError(
                    f"{name} is the fraction removed, in [0, 1) (1 would remove everything), "
                    f"got {value!r}"
                )
            setattr(self, name, float(value))
        if finite("l1", self.l1) < 0:
            raise PlanError(f"l1 must be >= 0, got {self.l1}")
        if self.mask_lr is not None and finite("mask_lr", self.mask_lr) <= 0:
            raise PlanError(f"mask_lr must be > 0 or null, got {self.mask_lr}")
        if self.backbone_score not in BACKBONE_SCORES:
            raise PlanError(
                f"backbone_score must be one of {', '.join(BACKBONE_SCORES)}, "
                f"got {self.backbone_score!r}"
            )
        if not isinstance(self.compensate, bool):
            raise PlanError(f"compensate must be true or false, got {self.compensate!r}")
        self.targets = tuple([self.targets] if isinstance(self.targets, str) else self.targets)
        self.lora()  # validates r, alpha, dropout, targets

    def lora(self) -> LoRA:
        """The LoRA method of the early phase."""
        return LoRA(r=self.r, alpha=self.alpha, dropout=self.dropout, targets=self.targets)

    def steps(self, total: int) -> int:
        """Early-phase steps for a run of ``total`` steps."""
        return _to_steps(self.early_steps, total)

    def rescoring_steps(self, total: int) -> int:
        """Re-scoring steps for a run of ``total`` steps (0: no re-scoring)."""
        return _to_steps(self.rescore_steps, total) if self.rescore_steps else 0


def _check_steps(name: str, steps: Any, minimum: int) -> None:
    if minimum == 0 and steps == 0 and not isinstance(steps, bool):
        return
    if isinstance(steps, bool) or not isinstance(steps, int | float):
        raise PlanError(
            f"{name} must be an int >= {minimum} or a fraction in (0, 1), got {steps!r}"
        )
    if isinstance(steps, int) and steps < minimum:
        raise PlanError(f"{name} must be >= {minimum} steps, got {steps}")
    if isinstance(steps, float) and not 0 < steps < 1:
        raise PlanError(f"{name} as a float is a fraction of training in (0, 1), got {steps}")


def _to_steps(steps: int | float, total: int) -> int:
    return max(1, round(steps * total)) if isinstance(steps, float) else int(steps)
