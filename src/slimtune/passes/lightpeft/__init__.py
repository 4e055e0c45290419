"""Light-PEFT: early pruning of the foundation model and of the PEFT modules (Gu et al., 2024).

Stage 1 (a short early phase, any training loop) estimates what matters::

    head h of block l:   o(x) -> o(x * m_lh)          (pre-hook on the family's ``o``)
    FFN neuron j:        fc2(a) -> fc2(a * m_lj)      (pre-hook on the family's ``fc2``)
    loss = task loss + lambda * sum(|m_head| + |m_ffn|)     masks start at 1, lambda = 1e-4

    LoRA module (all six linears, r 8):  importance = mean over tokens of ||dW x|| / ||W x||
    LoRA rank i:   |mean_j(A_ij dL/dA_ij)| + |mean_k(B_ki dL/dB_ki)|   (first-order Taylor)

Both PEFT scores are averaged over the second half of the early phase (padding tokens are left
out of the module score when the model is called with an ``attention_mask``). The masks are
plain parameters applied by forward pre-hooks on the modules the backbone family names: no model
file is edited and no ``forward`` is replaced.

Pruning (:func:`decide`): per block, the ``head_ratio`` lowest-mask heads; globally, the
``ffn_ratio`` lowest-mask FFN neurons (``backbone_score="taylor"`` ranks both by
``|m dL_task/dm|`` instead, averaged like the rank importance); globally, all but the top
``1 - module_ratio`` LoRA modules, then the ``rank_ratio`` least important ranks of those left
(a module left without a rank is dropped). A block always keeps at least one head and one
neuron, and at least one rank survives overall. :func:`prune` then shrinks the backbone and the
LoRA matrices physically (:mod:`slimtune.passes.shrink`) and re-applies a smaller LoRA plan with
the surviving weights.
A rank-pruned module keeps its scaling (``alpha`` is scaled with ``r``), so the pruned model with
its masks taken out equals the masked model whose pruned masks are zero and kept masks one.

``compensate`` (an option beyond the paper) also records, over the same second half, the mean
input of ``o`` and ``fc2`` per column (unmasked, padding left out) and adds what the removed
heads and neurons gave on average to those layers' biases (``W[:, removed] @ mean[removed]``,
with the LoRA update of ``W`` at that time). The pruned layer then outputs what the unpruned
one did with the removed units held at their means, instead of at zero.

In a loop (the masks are trained with the LoRA weights)::

    slimtune.apply(model, cfg.lora(), head=...)
    lp = LightPEFT(model, cfg)
    opt = AdamW([*lora_and_head_params, *lp.mask_parameters()], lr=lr)
    for step, batch in enumerate(batches):
        lp.recording = step >= steps // 2
        loss = task_loss(model(**batch)) + lp.penalty()
        loss.backward(); lp.after_backward(); opt.step(); opt.zero_grad()
    decision = lp.decide(); lp.remove()
    prune(model, decision)

Files: ``config`` (:class:`LightPEFTConfig`), ``masks`` (the pre-hooks), ``scorer``
(:class:`LightPEFT`, stage 1), ``decision`` (:class:`PruningDecision`, :func:`decide`) and
``prune`` (:func:`prune`). The figure of a decision is drawn by the application
(:func:`slimtune.app.plots.plot_pruning`).
"""

from .config import BACKBONE_SCORES, LightPEFTConfig
from .decision import PruningDecision, decide
from .prune import prune
from .scorer import LightPEFT

__all__ = ["BACKBONE_SCORES", "LightPEFT", "LightPEFTConfig", "PruningDecision", "decide", "prune"]
