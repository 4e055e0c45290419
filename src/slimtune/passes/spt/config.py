"""Settings of the SPT pass (:class:`SPTConfig`) and the parameter budget."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ...errors import PlanError, finite

__all__ = ["SPTConfig", "parse_budget"]


@dataclass
class SPTConfig:
    """SPT allocation settings.

    Attributes:
        budget: trainable parameters in the pool (``"0.5M"``, ``"200k"``, ``20000``) or a
            fraction of the backbone (``"0.5%"``). The head is not counted.
        structured: ``lora`` or ``adapter``.
        r: rank (LoRA) or bottleneck width (adapter) of structured modules.
        lora_alpha: LoRA scaling numerator (the paper uses no scaling: alpha = r).
        alpha: a matrix goes structured when ``c >= P_struct / alpha``.
        beta: a vector is tuned fully when ``c >= len / beta``.
        batches: number of batches for the sensitivity pass.
        batch_size: batch size of the sensitivity pass.
        bits: precision of the structured modules' matrices (32 = float; 1 to 8: trained and
            stored quantized, :mod:`slimtune.quant`; adapters then have no biases, as the
            low-bit adapters paper's). Sparse deltas and fully tuned vectors stay float: their
            positions, not their values, are what they cost (see ``unstructured``).
        unstructured: the paper's allocation (``True``): matrices below the structured
            threshold get sparse deltas at their most sensitive positions, vectors are tuned
            fully or sparsely, and the class token is tuned. ``False`` (beyond the paper):
            structured modules only, the budget spent on the most sensitive matrices; for a
            task stored in a few KB, where a sparse delta costs an 8-byte position for every
            value.
        per_block: a fraction of the budget (beyond the paper; 0 = the paper's allocation)
            spread over the blocks first: every block, in order, gets one structured module on
            its most sensitive matrix (largest summed sensitivity) while the reserved part
            lasts; the rest of the budget is allocated as usual over the other matrices. SPT
            alone puts a small budget where the sensitivity is largest, next to the head.
    """

    budget: Any = "0.5%"
    structured: str = "lora"
    r: int = 8
    lora_alpha: float | None = None
    alpha: float = 10.0
    beta: float = 5.0
    batches: int = 16
    batch_size: int = 32
    bits: int = 32
    unstructured: bool = True
    per_block: float = 0.0

    def __post_init__(self) -> None:
        if self.structured not in ("lora", "adapter"):
            raise PlanError(
                f"SPT structured method must be 'lora' or 'adapter', got {self.structured!r}"
            )
        if not isinstance(self.r, int) or self.r < 1:
            raise PlanError(f"SPT rank r must be a positive integer, got {self.r!r}")
        finite("SPT alpha", self.alpha)
        finite("SPT beta", self.beta)
        parse_budget(self.budget, None)  # the form of the budget (its size needs the model)
        if self.alpha <= 0 or self.beta <= 0:
            raise PlanError(
                f"SPT thresholds alpha and beta must be > 0, got {self.alpha}, {self.beta}"
            )
        if self.batches < 1 or self.batch_size < 1:
            raise PlanError("SPT needs at least one batch of at least one example")
        if isinstance(self.bits, bool) or self.bits not in (1, 2, 3, 4, 5, 6, 7, 8, 32):
            raise PlanError(f"SPT bits must be 1 to 8, or 32 (float), got {self.bits!r}")
        if not 0.0 <= finite("SPT per_block", self.per_block) < 1.0:
            raise PlanError(
                f"SPT per_block is a fraction of the budget in [0, 1), got {self.per_block!r}"
            )
        if not isinstance(self.unstructured, bool):
            raise PlanError(f"SPT unstructured must be true or false, got {self.unstructured!r}")


def parse_budget(budget: Any, base_params: int | None) -> int:
    """``"0.5M"`` -> 500000, ``"200k"`` -> 200000, ``"0.5%"`` -> 0.5% of ``base_params``.

    ``base_params=None`` checks the form only (a fraction then counts as 1)."""
    text = str(budget).strip().lower().replace("_", "")
    pct: float | None = None
    try:
        if isinstance(budget, bool):
            raise ValueError(budget)
        if text.endswith("%"):
            pct = float(text[:-1])
            value = pct / 100 * (base_params or 0)
        elif text[-1:] in ("k", "m", "b"):
            value = float(text[:-1]) * {"k": 1e3, "m": 1e6, "b": 1e9}[text[-1]]
        else:
            value = float(text)
    except ValueError as exc:
        raise PlanError(
            f"budget {budget!r} is not a count (e.g. 500000, '0.5M', '200k') or a fraction ('0.5%')"
        ) from exc
    if pct is not None and not (math.isfinite(pct) and pct > 0):
        raise PlanError(f"budget must be positive and finite, got {budget!r}")
    if pct is not None and base_params is None:  # the form only
        return 1
    if not math.isfinite(value):
        raise PlanError(f"budget must be a finite count or fraction, got {budget!r}")
    n = int(round(value))
    if n <= 0:
        raise PlanError(f"budget must be positive, got {budget!r}")
    if base_params is not None and n > base_params:
        raise PlanError(f"budget {budget!r} ({n:,}) exceeds the model's {base_params:,} parameters")
    return n
