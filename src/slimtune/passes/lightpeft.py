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
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..core import apply_plan, get_state, remove, wrappers
from ..errors import PlanError
from ..families import Family, detect_family
from ..methods.base import unwrap
from ..methods.lora import LoRA, LoRALinear
from ..plan import Plan, PlanEntry
from .shrink import BlockInfo, block_infos, head_columns, layer_params, shrink

__all__ = [
    "LightPEFTConfig",
    "LightPEFT",
    "PruningDecision",
    "decide",
    "prune",
    "plot_pruning",
]

SIX = ("q", "k", "v", "o", "fc1", "fc2")
BACKBONE_SCORES = ("mask", "taylor", "random")


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

    def __post_init__(self) -> None:
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
        if float(self.l1) < 0:
            raise PlanError(f"l1 must be >= 0, got {self.l1}")
        if self.mask_lr is not None and float(self.mask_lr) <= 0:
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


class _Masks(nn.Module):
    """One mask per head and per FFN neuron of every block, applied by forward pre-hooks."""

    def __init__(self, model: nn.Module, blocks: list[BlockInfo]) -> None:
        super().__init__()
        p = next(model.parameters())
        self.heads = nn.ParameterList(
            [nn.Parameter(torch.ones(b.num_heads, device=p.device, dtype=p.dtype)) for b in blocks]
        )
        self.neurons = nn.ParameterList(
            [nn.Parameter(torch.ones(b.ffn, device=p.device, dtype=p.dtype)) for b in blocks]
        )
        self.handles = []
        for b, mh, mn in zip(blocks, self.heads, self.neurons, strict=True):
            self.handles.append(
                model.get_submodule(b.o).register_forward_pre_hook(_head_hook(mh, b.head_dim))
            )
            self.handles.append(model.get_submodule(b.fc2).register_forward_pre_hook(_ffn_hook(mn)))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def _head_hook(mask: Tensor, head_dim: int) -> Any:
    def hook(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        x = (x.unflatten(-1, (mask.shape[0], head_dim)) * mask[:, None].to(x.dtype)).flatten(-2)
        return (x, *args[1:])

    return hook


def _ffn_hook(mask: Tensor) -> Any:
    def hook(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (args[0] * mask.to(args[0].dtype), *args[1:])

    return hook


class LightPEFT:
    """Stage 1 of Light-PEFT on a model with LoRA applied (see the module docstring).

    Args:
        model: a model that went through ``slimtune.apply`` with LoRA (other methods are not
            supported by :func:`prune`).
        config: the pass settings.
        family: the backbone family (default: detected).

    Attributes:
        recording: while ``True``, forward passes and :meth:`after_backward` accumulate the
            module and rank importance (set it for the second half of the early phase).
    """

    def __init__(
        self, model: nn.Module, config: LightPEFTConfig, family: Family | None = None
    ) -> None:
        get_state(model)
        self.model = model
        self.config = config
        self.family = family or detect_family(model)
        self.blocks = block_infos(model, self.family)
        self.lora = {n: m for n, m in wrappers(model) if isinstance(m, LoRALinear)}
        if not self.lora:
            raise PlanError("Light-PEFT needs LoRA applied to the model (config.lora())")
        self.masks = _Masks(model, self.blocks)
        self.recording = False
        self.module_sum = {n: 0.0 for n in self.lora}
        self.module_count = {n: 0 for n in self.lora}
        self.rank_sum = {n: torch.zeros(m.r, dtype=torch.float64) for n, m in self.lora.items()}
        self.rank_count = 0
        self.head_sum = [torch.zeros(b.num_heads, dtype=torch.float64) for b in self.blocks]
        self.neuron_sum = [torch.zeros(b.ffn, dtype=torch.float64) for b in self.blocks]
        self._tokens: Tensor | None = None
        self._handles = [model.register_forward_pre_hook(self._capture_mask, with_kwargs=True)]
        for name, module in self.lora.items():
            self._handles.append(module.register_forward_hook(self._module_hook(name)))
        self.input_sum: dict[str, Tensor] = {}
        self.input_count: dict[str, int] = {}
        if config.compensate:
            for b in self.blocks:
                for name in (b.o, b.fc2):
                    lin = unwrap(model.get_submodule(name))
                    if not isinstance(lin, nn.Linear) or lin.bias is None:
                        raise PlanError(f"compensate needs a bias on {name}; it has none")
                    self.input_sum[name] = torch.zeros(lin.in_features, dtype=torch.float64)
                    self.input_count[name] = 0
                    # before the mask hook: the mean of the unmasked input
                    self._handles.append(
                        model.get_submodule(name).register_forward_pre_hook(
                            self._input_hook(name), prepend=True
                        )
                    )

    def mask_parameters(self) -> list[nn.Parameter]:
        """The head and neuron masks (train them with the LoRA weights)."""
        return list(self.masks.parameters())

    def penalty(self) -> Tensor:
        """``lambda * sum(|m_head| + |m_ffn|)``."""
        return torch.stack([m.abs().sum() for m in self.masks.parameters()]).sum() * self.config.l1

    def _capture_mask(
        self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        mask = kwargs.get("attention_mask")
        self._tokens = mask.bool() if isinstance(mask, Tensor) and mask.dim() == 2 else None

    def _real_tokens(self, x: Tensor) -> Tensor:
        """``x`` as ``[tokens, features]``, detached, without the padded positions of the
        current call (when the model was called with a 2-D ``attention_mask``)."""
        x = x.detach()
        if self._tokens is not None and x.dim() == 3 and x.shape[:2] == self._tokens.shape:
            x = x[self._tokens]
        return x.reshape(-1, x.shape[-1])

    def _module_hook(self, name: str) -> Any:
        def hook(module: LoRALinear, args: tuple[Any, ...], _out: Any) -> None:
            if not self.recording or not module.enabled or module.merged:
                return
            with torch.no_grad():
                x = self._real_tokens(args[0])
                if x.shape[0] == 0:
                    return
                a, b = module.weights()
                delta = (x @ a.t()) @ b.t() * module.scaling
                lin = unwrap(module.base_layer)
                assert isinstance(lin, nn.Linear)
                base = x @ lin.weight.t()
                ratio = delta.norm(dim=-1) / base.norm(dim=-1).clamp_min(1e-12)
                self.module_sum[name] += float(ratio.mean())
                self.module_count[name] += 1

        return hook

    def _input_hook(self, name: str) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            if not self.recording:
                return
            with torch.no_grad():
                x = self._real_tokens(args[0])
                if x.shape[0] == 0:
                    return
                self.input_sum[name] += x.float().sum(0).cpu().double()
                self.input_count[name] += x.shape[0]

        return hook

    @torch.no_grad()
    def bias_shift(self, decision: PruningDecision) -> dict[str, list[float]]:
        """Per ``o`` and ``fc2`` linear, what the heads and neurons ``decision`` removes gave
        its output on average over the recorded passes: ``W[:, removed] @ mean[removed]``
        (``W`` with its LoRA update). Empty without ``compensate``.

        Raises:
            PlanError: ``compensate`` is on but nothing was recorded.
        """
        if not self.config.compensate:
            return {}
        out: dict[str, list[float]] = {}
        for b in self.blocks:
            heads, neurons = set(decision.heads[b.name]), set(decision.neurons[b.name])
            removed = [h for h in range(b.num_heads) if h not in heads]
            cols_head = head_columns(removed, b.head_dim).tolist()
            cols_ffn = [j for j in range(b.ffn) if j not in neurons]
            for name, cols in ((b.o, cols_head), (b.fc2, cols_ffn)):
                if not cols:
                    continue
                if self.input_count[name] == 0:
                    raise PlanError(
                        f"compensate: no input of {name} was recorded (set `recording = True` "
                        "for the second half of the early phase)"
                    )
                module = self.model.get_submodule(name)
                lin = unwrap(module)
                assert isinstance(lin, nn.Linear)
                w = lin.weight.detach().float()
                if isinstance(module, LoRALinear) and module.enabled and not module.merged:
                    w = w + module.delta_weight().detach().float()
                idx = torch.tensor(cols, dtype=torch.long)
                mean = self.input_sum[name][idx] / self.input_count[name]
                out[name] = (w[:, idx.to(w.device)].cpu().double() @ mean).tolist()
        return out

    @torch.no_grad()
    def after_backward(self) -> None:
        """Accumulate the rank importance (and, with ``backbone_score="taylor"``, the head and
        neuron importance) from the current gradients (call before the step)."""
        if not self.recording:
            return
        if self.config.backbone_score == "taylor":
            for sums, masks in (
                (self.head_sum, self.masks.heads),
                (self.neuron_sum, self.masks.neurons),
            ):
                for acc, m in zip(sums, masks, strict=True):
                    if m.grad is None:
                        continue
                    # the task loss's gradient: the L1 term adds l1 * sign(m) to it
                    task = m.grad - self.config.l1 * torch.sign(m)
                    acc += (m * task).abs().double().cpu()
        for name, m in self.lora.items():
            if m.lora_A.grad is None or m.lora_B.grad is None:
                continue
            ia = (m.lora_A * m.lora_A.grad).mean(dim=1).abs()
            ib = (m.lora_B * m.lora_B.grad).mean(dim=0).abs()
            self.rank_sum[name] += (ia + ib).double().cpu()
        self.rank_count += 1

    def module_importance(self) -> dict[str, float]:
        """Mean ``||dW x|| / ||W x||`` per LoRA module over the recorded forward passes."""
        return {n: s / max(self.module_count[n], 1) for n, s in self.module_sum.items()}

    def rank_importance(self) -> dict[str, Tensor]:
        """Mean first-order importance of every rank over the recorded steps."""
        return {n: (s / max(self.rank_count, 1)).float() for n, s in self.rank_sum.items()}

    def backbone_importance(self) -> tuple[list[Tensor], list[Tensor]]:
        """Per block, the head and the FFN neuron scores that rank them for pruning: the mask
        values, their mean first-order importance (``backbone_score="taylor"``) or uniform
        random scores (``"random"``, a control)."""
        if self.config.backbone_score == "random":
            g = torch.Generator().manual_seed(torch.initial_seed())
            return (
                [torch.rand(b.num_heads, generator=g) for b in self.blocks],
                [torch.rand(b.ffn, generator=g) for b in self.blocks],
            )
        if self.config.backbone_score == "taylor":
            n = max(self.rank_count, 1)
            return (
                [(s / n).float() for s in self.head_sum],
                [(s / n).float() for s in self.neuron_sum],
            )
        return (
            [m.detach().cpu() for m in self.masks.heads],
            [m.detach().cpu() for m in self.masks.neurons],
        )

    def decide(self) -> PruningDecision:
        """What to keep, from the masks and the recorded importance (see :func:`decide`)."""
        if self.rank_count == 0:
            raise PlanError(
                "no importance was recorded: set `recording = True` for the second half of the "
                "early phase and call after_backward() after each backward pass"
            )
        heads, neurons = self.backbone_importance()
        decision = decide(
            self.blocks,
            heads,
            neurons,
            self.module_importance(),
            self.rank_importance(),
            self.config,
        )
        decision.scores["backbone_score"] = self.config.backbone_score
        decision.bias_shift = self.bias_shift(decision)
        if self.config.backbone_score != "mask":
            decision.scores["head_masks"] = [m.detach().cpu().tolist() for m in self.masks.heads]
            decision.scores["head_scores"] = [h.tolist() for h in heads]
        return decision

    def remove(self) -> None:
        """Take the masks and importance hooks out of the model."""
        self.masks.remove()
        for h in self._handles:
            h.remove()
        self._handles = []


@dataclass
class PruningDecision:
    """What survives Light-PEFT pruning (plain data, JSON-ready through :meth:`to_dict`).

    Attributes:
        heads: block name -> kept head indices.
        neurons: block name -> kept FFN neuron indices.
        ranks: LoRA module name -> kept rank indices (modules not listed are removed).
        before: block name -> ``{"heads": n, "ffn": n}`` before pruning.
        lora_before: LoRA module name -> rank before pruning.
        scores: the masks and importance the decision came from (lists of floats).
        bias_shift: linear name -> what to add to its bias before shrinking (``compensate``:
            the removed heads' and neurons' mean contribution); empty: nothing.
    """

    heads: dict[str, list[int]]
    neurons: dict[str, list[int]]
    ranks: dict[str, list[int]]
    before: dict[str, dict[str, int]] = field(default_factory=dict)
    lora_before: dict[str, int] = field(default_factory=dict)
    scores: dict[str, Any] = field(default_factory=dict)
    bias_shift: dict[str, list[float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PruningDecision:
        return cls(**{k: data[k] for k in data if k in cls.__dataclass_fields__})


def _n_removed(ratio: float, n: int) -> int:
    return min(n, math.floor(ratio * n + 1e-9))


def _lowest(scores: Tensor, k: int) -> set[int]:
    """Indices of the ``k`` lowest scores (ties broken by index, deterministic)."""
    if k <= 0:
        return set()
    order = sorted(range(len(scores)), key=lambda i: (float(scores[i]), i))
    return set(order[:k])


def decide(
    blocks: list[BlockInfo],
    head_masks: list[Tensor],
    ffn_masks: list[Tensor],
    module_importance: Mapping[str, float],
    rank_importance: Mapping[str, Tensor],
    config: LightPEFTConfig,
) -> PruningDecision:
    """Choose the heads, neurons, LoRA modules and ranks to keep.

    The number removed is ``floor(ratio * n)`` of the ``n`` candidates with the lowest scores
    (ties by position): per block for heads, over all blocks for neurons, modules and ranks.
    A block always keeps its best head and its best neuron; the best rank overall survives.
    """
    heads: dict[str, list[int]] = {}
    neurons: dict[str, list[int]] = {}
    for b, m in zip(blocks, head_masks, strict=True):
        drop = _lowest(m.abs(), min(_n_removed(config.head_ratio, len(m)), len(m) - 1))
        heads[b.name] = [i for i in range(len(m)) if i not in drop]
    flat = torch.cat([m.abs().float() for m in ffn_masks])
    drop_all = _lowest(flat, _n_removed(config.ffn_ratio, len(flat)))
    start = 0
    for b, m in zip(blocks, ffn_masks, strict=True):
        kept = [i for i in range(len(m)) if start + i not in drop_all]
        if not kept:  # never empty a block: keep its strongest neuron
            kept = [int(m.abs().argmax())]
        neurons[b.name] = kept
        start += len(m)
    names = list(module_importance)
    imp = torch.tensor([float(module_importance[n]) for n in names])
    drop_mod = _lowest(imp, min(_n_removed(config.module_ratio, len(names)), len(names) - 1))
    kept_mods = [n for i, n in enumerate(names) if i not in drop_mod]
    pairs = [(n, i) for n in kept_mods for i in range(len(rank_importance[n]))]
    rscores = torch.tensor([float(rank_importance[n][i]) for n, i in pairs])
    drop_rank = _lowest(rscores, min(_n_removed(config.rank_ratio, len(pairs)), len(pairs) - 1))
    ranks: dict[str, list[int]] = {}
    for j, (n, i) in enumerate(pairs):
        if j not in drop_rank:
            ranks.setdefault(n, []).append(i)
    return PruningDecision(
        heads=heads,
        neurons=neurons,
        ranks=ranks,
        before={b.name: {"heads": b.num_heads, "ffn": b.ffn} for b in blocks},
        lora_before={n: len(rank_importance[n]) for n in names},
        scores={
            "head_masks": [m.tolist() for m in head_masks],
            "module_importance": {n: float(module_importance[n]) for n in names},
            "rank_importance": {n: rank_importance[n].tolist() for n in names},
        },
    )


def prune(model: nn.Module, decision: PruningDecision, family: Family | None = None) -> Plan:
    """Apply a decision to a LoRA model, in place: shrink it and keep the surviving LoRA.

    The backbone's heads and neurons are removed physically (with the LoRA matrices alongside),
    the removed LoRA modules are taken out, the kept ones are sliced to their surviving ranks
    (``alpha`` scaled with ``r`` so ``alpha / r`` is unchanged) and re-applied with their trained
    values. Head weights are kept. ``decision.bias_shift`` is added to the named linears' biases
    first (``compensate``).

    Returns:
        The new plan (also on the model, ``slimtune.get_state(model).plan``); its
        ``meta["light_peft"]`` records the kept sizes.

    Raises:
        PlanError: the model has methods other than LoRA, or the decision keeps no rank.
    """
    family = family or detect_family(model)
    state = get_state(model)
    others = sorted({e.method for e in state.plan.entries} - {"lora"})
    if others:
        raise PlanError(f"Light-PEFT prunes LoRA plans only; this plan also has {others}")
    if not decision.ranks or not any(decision.ranks.values()):
        raise PlanError("the pruning decision keeps no LoRA rank; lower module_ratio/rank_ratio")
    before = layer_params(model, family)
    shifted: list[tuple[nn.Linear, list[float]]] = []
    for name, shift in decision.bias_shift.items():  # all checked before any is applied
        lin = unwrap(model.get_submodule(name))
        if not isinstance(lin, nn.Linear) or lin.bias is None:
            raise PlanError(f"bias_shift names {name}, which is not a linear with a bias")
        if len(shift) != lin.out_features:
            raise PlanError(
                f"bias_shift of {name} has {len(shift)} values for {lin.out_features} outputs"
            )
        shifted.append((lin, shift))
    with torch.no_grad():
        for lin, shift in shifted:
            lin.bias.add_(torch.tensor(shift, dtype=lin.bias.dtype, device=lin.bias.device))
    shrink(model, decision.heads, decision.neurons, family)
    lora = {n: m for n, m in wrappers(model) if isinstance(m, LoRALinear)}
    unknown = sorted(set(decision.ranks) - set(lora))
    if unknown:
        raise PlanError(f"the decision keeps ranks of modules without LoRA: {unknown}")
    entries = {e.target: e for e in state.plan.entries}
    kept: dict[str, tuple[Tensor, Tensor]] = {}
    new_entries = []
    for name, idx in decision.ranks.items():
        m = lora[name]
        if not idx:
            continue
        ix = torch.tensor(sorted(idx), dtype=torch.long, device=m.lora_A.device)
        kept[name] = (m.lora_A[ix].detach().clone(), m.lora_B[:, ix].detach().clone())
        settings = dict(entries[name].settings)
        settings["alpha"] = float(settings["alpha"]) * len(ix) / int(settings["r"])
        settings["r"] = len(ix)
        new_entries.append(PlanEntry("lora", name, settings))
    order = {e.target: i for i, e in enumerate(state.plan.entries)}
    new_entries.sort(key=lambda e: order[e.target])
    plan = Plan(
        entries=new_entries,
        head=list(state.plan.head),
        family=state.plan.family,
        meta={
            **state.plan.meta,
            "light_peft": {
                "blocks": {
                    n: {"heads": len(decision.heads[n]), "ffn": len(decision.neurons[n])}
                    for n in decision.heads
                },
                "layer_params_before": before,
                "layer_params_after": layer_params(model, family),
            },
        },
    )
    remove(model)
    apply_plan(model, plan)
    with torch.no_grad():
        for name, (a, b) in kept.items():
            w = model.get_submodule(name)
            assert isinstance(w, LoRALinear)
            w.lora_A.copy_(a)
            w.lora_B.copy_(b)
    return plan


def plot_pruning(decision: PruningDecision, path: str | Path, title: str = "") -> Path:
    """Bar charts per block: heads, FFN neurons, LoRA modules and ranks kept vs removed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import atomic_write

    blocks = list(decision.heads)
    x = list(range(len(blocks)))
    hk = [len(decision.heads[b]) for b in blocks]
    hb = [decision.before[b]["heads"] for b in blocks]
    nk = [len(decision.neurons[b]) for b in blocks]
    nb = [decision.before[b]["ffn"] for b in blocks]

    def owner(module: str) -> int:
        hits = [i for i, b in enumerate(blocks) if module.startswith(b + ".")]
        return hits[-1] if hits else -1

    rk = [0] * len(blocks)
    rb = [0] * len(blocks)
    for name, r in decision.lora_before.items():
        i = owner(name)
        if i >= 0:
            rb[i] += r
            rk[i] += len(decision.ranks.get(name, []))
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, kept, before, label in (
        (axes[0], hk, hb, "attention heads"),
        (axes[1], nk, nb, "FFN neurons"),
        (axes[2], rk, rb, "LoRA ranks"),
    ):
        ax.bar(x, kept, color="C0", label="kept")
        ax.bar(
            x,
            [b - k for k, b in zip(kept, before, strict=True)],
            bottom=kept,
            color="C3",
            alpha=0.5,
            label="pruned",
        )
        ax.set_xticks(x)
        ax.set_xlabel("block")
        ax.set_title(label)
    axes[0].legend()
    fig.suptitle(title or "Light-PEFT pruning per block")
    fig.tight_layout()
    out = Path(path)
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return out
