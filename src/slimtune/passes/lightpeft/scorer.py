"""Stage 1 of Light-PEFT: the masks, the PEFT importance and the compensation means, recorded
during an early phase of training (:class:`LightPEFT`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ...core import family_of, get_state, wrappers
from ...errors import PlanError
from ...families import Family
from ...linear import dims, is_linear, weight_oi
from ...methods.base import unwrap
from ...methods.lora import LoRALinear
from ..blocks import block_infos, head_columns
from .config import LightPEFTConfig
from .decision import PruningDecision, decide
from .masks import Masks

__all__ = ["LightPEFT"]


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
        self.family = family or family_of(model)
        self.blocks = block_infos(model, self.family)
        self.lora = {n: m for n, m in wrappers(model) if isinstance(m, LoRALinear)}
        if not self.lora:
            raise PlanError("Light-PEFT needs LoRA applied to the model (config.lora())")
        self.masks = Masks(model, self.blocks)
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
                    if not is_linear(lin) or getattr(lin, "bias", None) is None:
                        raise PlanError(
                            f"compensate needs a bias on {name}; it has none (Llama-style "
                            "models have no biases: prune without compensate)"
                        )
                    self.input_sum[name] = torch.zeros(dims(lin)[0], dtype=torch.float64)
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
                w = weight_oi(unwrap(module.base_layer))
                base = x @ (w if module.rows is None else w[module.rows]).t()
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
                w = weight_oi(unwrap(module)).detach().float()
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
