"""SPT step 1: accumulated squared gradients of every candidate weight (:func:`sensitivity`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import torch
from torch import Tensor, nn

from ...core import family_of
from ...errors import PlanError
from ...families import Family, resolve_modules
from ...linear import dims, linear_types
from ...losses import task_loss
from ...qbase.layers import is_quantized

__all__ = ["candidates", "sensitivity"]


def candidates(model: nn.Module, family: Family | None = None) -> dict[str, nn.Parameter]:
    """The SPT pool: matrices of the family's candidate roles and vectors inside the blocks."""
    family = family or family_of(model)
    pool: dict[str, nn.Parameter] = {}
    roles = [r for r in family.candidate_roles if r in family.roles]
    if not roles:
        raise PlanError(
            f"the {family.name} family names no q/k/v/o/fc1/fc2 roles: SPT needs a known backbone family"
        )
    for name in resolve_modules(model, family, roles, kinds=linear_types()):
        if is_quantized(model.get_submodule(name)):
            continue  # scored through its dequantized weight by :class:`_WeightGrads`
        pool[name + ".weight"] = cast(nn.Parameter, model.get_submodule(name).weight)
    blocks = family.block_names(model)
    for n, p in model.named_parameters():
        if p.dim() == 1 and any(n.startswith(b + ".") for b in blocks):
            pool[n] = p
    return pool


class _WeightGrads:
    """dL/dW of quantized linears (whose weights hold codes, not parameters), from hooks:
    ``y = x W^T`` gives ``dL/dW = sum over tokens of g^T x`` with ``g = dL/dy``, the same
    gradient a float weight equal to the dequantized one would get."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.grads: dict[str, Tensor] = {}
        self.handles = []
        for name in names:
            module = model.get_submodule(name)
            self.handles.append(module.register_forward_hook(self._hook(name)))
        emb = getattr(model, "get_input_embeddings", lambda: None)()
        if isinstance(emb, nn.Module):  # so gradients reach the first block's linears
            self.handles.append(emb.register_forward_hook(lambda m, i, o: o.requires_grad_(True)))

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, inputs: tuple[Any, ...], out: Tensor) -> None:
            if not out.requires_grad:
                return
            x = inputs[0].detach()

            def grad(g: Tensor) -> None:
                gw = g.reshape(-1, g.shape[-1]).float().t() @ x.reshape(-1, x.shape[-1]).float()
                if name in self.grads:
                    self.grads[name] += gw
                else:
                    self.grads[name] = gw

            out.register_hook(grad)

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _quantized_candidates(model: nn.Module, family: Family) -> list[str]:
    roles = [r for r in family.candidate_roles if r in family.roles]
    names = resolve_modules(model, family, roles, kinds=linear_types()) if roles else []
    return [n for n in names if is_quantized(model.get_submodule(n))]


def sensitivity(
    model: nn.Module,
    batches: Iterable[dict[str, Tensor]],
    *,
    family: Family | None = None,
    n_batches: int = 16,
) -> dict[str, Tensor]:
    """Accumulated squared gradients of the mean cross-entropy for every pool parameter.

    The loss is :func:`slimtune.losses.task_loss`: classification, or next-token prediction
    for a causal LM whose batches carry token ``labels`` (``-100`` where there is no loss).

    The model is put in train mode (dropout on) for the pass and restored afterwards; the
    requires_grad flags are restored too.
    """
    pool = candidates(model, family)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was = model.training
    names = {id(p): n for n, p in pool.items()}
    for p in model.parameters():
        p.requires_grad_(id(p) in names)
    scores = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in pool.items()}
    quantized = _quantized_candidates(model, family or family_of(model))
    for name in quantized:
        lin = model.get_submodule(name)
        d_in, d_out = dims(lin)
        device = cast(Tensor, lin.weight).device
        scores[name + ".weight"] = torch.zeros(d_out, d_in, device=device, dtype=torch.float32)
    taps = _WeightGrads(model, quantized) if quantized else None
    model.train()
    done = 0
    try:
        for batch in batches:
            if done >= n_batches:
                break
            model.zero_grad(set_to_none=True)
            if taps is not None:
                taps.grads.clear()
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            out = model(**inputs)
            loss = task_loss(out, batch["labels"])
            loss.backward()
            for n, p in pool.items():
                if p.grad is not None:
                    g = p.grad.detach().float()
                    scores[n].addcmul_(g, g)  # in place: no temporary per tensor
            if taps is not None:
                for n, g in taps.grads.items():
                    scores[n + ".weight"].addcmul_(g, g)
            done += 1
    finally:
        if taps is not None:
            taps.close()
        model.zero_grad(set_to_none=True)
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.train(was)
    if done == 0:
        raise PlanError("sensitivity needs at least one batch of data")
    return scores
