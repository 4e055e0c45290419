"""SPT: sensitivity-aware parameter allocation (He et al., ICCV 2023).

1. **Sensitivity.** With the task head attached and the model in train mode, accumulate
   ``s = sum over batches (dL/dw)^2`` for every candidate weight (q/k/v/o/fc1/fc2 matrices
   and every norm/bias vector inside the blocks; head, CLS and embeddings excluded).
2. **Threshold without concatenation.** The top-``tau`` threshold over all candidate entries is
   the ``tau``-th largest score. Each tensor's scores are sorted once; the threshold is found by
   bisection over the (monotone) bit patterns of non-negative float32 values, counting entries
   above a candidate with ``searchsorted`` per tensor. No tensor of all scores is ever built, and
   the result equals ``torch.cat(scores).topk(tau).values[-1]`` exactly.
3. **Allocation.** For a threshold, a matrix with ``c`` sensitive entries gets LoRA/adapter if
   ``c >= P_struct / alpha`` (``P_struct`` its cost at rank ``r``) and ``c`` sparse positions
   otherwise; a vector is tuned fully if ``c >= len / beta``, else sparsely. ``tau`` is swept to
   make the total closest to the budget.

Files: ``config`` (:class:`SPTConfig`, budgets), ``sensitivity`` (step 1), ``threshold``
(step 2) and ``allocate`` (step 3). The heatmap of a plan is drawn by the application
(:func:`slimtune.app.plots.plot_allocation`).
"""

from .allocate import allocate
from .config import SPTConfig, parse_budget
from .sensitivity import candidates, sensitivity
from .threshold import topk_threshold, topk_thresholds

__all__ = [
    "SPTConfig",
    "allocate",
    "candidates",
    "parse_budget",
    "sensitivity",
    "topk_threshold",
    "topk_thresholds",
]
