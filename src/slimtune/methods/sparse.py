"""Sparse (unstructured) tuning: trainable deltas at chosen positions of frozen weights.

For a linear layer with positions ``P`` (flat indices into the ``out x in`` weight)::

    y = x (W + D)^T + b,   D = scatter(delta, P)   (D is never materialised)

Memory is proportional to ``|P|``: the forward adds ``x D^T`` with a sparse matrix product,
the backward returns ``dL/dx = g (W + D)`` the same way and ``dL/d delta = (g^T x)[P]``
computed one layer at a time, from the saved input columns that hold positions only. No
dense copy of ``W`` is kept or cloned per step (the SPT paper's code clones every weight on
every forward and uses more memory than full tuning).
Vectors (biases, norm weights) get the same deltas through a small dense scatter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..errors import PlanError
from ..families import Family
from ..linear import dims, float_dtype
from ..plan import Plan, PlanEntry
from ..qbase.layers import is_quantized, logical_shape, refuse_merge
from .base import MethodConfig, Wrapper, get_module, set_module, unwrap
from .registry import register_method

__all__ = ["Sparse", "SparseLayer"]


@dataclass
class Sparse(MethodConfig):
    """Tune given positions of given parameters.

    Attributes:
        indices: parameter name -> flat positions (any integer tensor or list).
    """

    name = "sparse"
    indices: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.indices:
            raise PlanError("Sparse needs indices: {parameter name: flat positions}")

    def plan(self, model: nn.Module, family: Family) -> Plan:
        by_module: dict[str, dict[str, str]] = {}
        tensors: dict[str, Tensor] = {}
        params = dict(model.named_parameters())
        for pname, idx in self.indices.items():
            if pname not in params:
                raise PlanError(f"Sparse: model has no parameter {pname!r}")
            t = torch.as_tensor(idx, dtype=torch.long).reshape(-1).unique()
            n = logical_shape(params[pname]).numel()
            if t.numel() == 0:
                continue
            if int(t.min()) < 0 or int(t.max()) >= n:
                raise PlanError(
                    f"Sparse: positions for {pname!r} must be in [0, {n}), got [{int(t.min())}, {int(t.max())}]"
                )
            module, _, attr = pname.rpartition(".")
            key = f"sparse/{pname}"
            tensors[key] = t
            by_module.setdefault(module, {})[attr] = key
        entries = [PlanEntry("sparse", m, {"params": a}) for m, a in by_module.items()]
        return Plan(entries=entries, tensors=tensors)


class _SparseLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, delta: Tensor, idx: Tensor
    ) -> Tensor:  # type: ignore[override]
        out_f, in_f = weight.shape
        rows, cols = idx // in_f, idx % in_f
        x2 = x.reshape(-1, in_f)
        y = F.linear(x2, weight, bias)
        y += _spmm(rows, cols, delta, (out_f, in_f), x2.t()).t()
        # dL/d delta needs only the input columns that hold positions: keep just those when
        # they are few (the frozen layer itself would keep no input at all).
        used, where = torch.unique(cols, return_inverse=True)
        if 2 * used.numel() < in_f:
            ctx.save_for_backward(x2[:, used], weight, delta, rows, cols, where)
        else:
            ctx.save_for_backward(x2, weight, delta, rows, cols, cols)
        ctx.shape = x.shape
        return y.reshape(*x.shape[:-1], out_f)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x_used, weight, delta, rows, cols, where = ctx.saved_tensors
        g2 = grad.reshape(-1, weight.shape[0])
        grad_x = grad_d = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = g2 @ weight
            grad_x += _spmm(cols, rows, delta, (weight.shape[1], weight.shape[0]), g2.t()).t()
            grad_x = grad_x.reshape(ctx.shape)
        if ctx.needs_input_grad[3]:
            grad_d = _sampled_dot(g2, x_used, rows, where)
        if ctx.needs_input_grad[2]:
            grad_b = g2.sum(0)
        return grad_x, None, grad_b, grad_d, None


def _spmm(
    rows: Tensor, cols: Tensor, values: Tensor, shape: tuple[int, int], dense: Tensor
) -> Tensor:
    """``S @ dense`` for the sparse matrix ``S[rows, cols] = values`` (never densified)."""
    s = torch.sparse_coo_tensor(torch.stack([rows, cols]), values, shape, check_invariants=False)
    return torch.sparse.mm(s, dense)


def _sampled_dot(g: Tensor, x: Tensor, rows: Tensor, cols: Tensor, chunk: int = 1 << 22) -> Tensor:
    """``(g^T x)[rows, cols]`` without forming ``g^T x`` when the positions are few."""
    n, k = g.shape[0], rows.numel()
    if k * 8 >= g.shape[1] * x.shape[1]:
        return (g.t() @ x)[rows, cols]
    out = torch.empty(k, dtype=g.dtype, device=g.device)
    step = max(1, chunk // max(n, 1))
    for s in range(0, k, step):
        r, c = rows[s : s + step], cols[s : s + step]
        out[s : s + step] = (g[:, r] * x[:, c]).sum(0)
    return out


class SparseLayer(Wrapper):
    """Adds trainable deltas at fixed positions of the wrapped layer's parameters."""

    method = "sparse"
    mergeable = True

    def __init__(self, base_layer: nn.Module, positions: dict[str, Tensor]) -> None:
        super().__init__(base_layer)
        inner = unwrap(base_layer)
        self.param_names = sorted(positions)
        for attr in self.param_names:
            p = getattr(inner, attr, None)
            if not isinstance(p, nn.Parameter):
                raise PlanError(
                    f"{type(inner).__name__} has no parameter {attr!r} for sparse tuning"
                )
            given = positions[attr]
            if given.is_floating_point() or given.is_complex() or given.dtype == torch.bool:
                raise PlanError(f"sparse positions of {attr!r} must be integers, got {given.dtype}")
            idx = given.to(device=p.device, dtype=torch.long).reshape(-1)
            n = logical_shape(p).numel()
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
                raise PlanError(
                    f"sparse positions of {attr!r} must be in [0, {n}), got "
                    f"[{int(idx.min())}, {int(idx.max())}]"
                )
            if idx.numel() != int(torch.unique(idx).numel()):
                raise PlanError(f"sparse positions of {attr!r} repeat a position")
            self.register_buffer(f"{attr}_idx", idx)
            # a quantized base's weight holds codes: the deltas are in its compute dtype
            dtype = float_dtype(inner) if attr == "weight" and is_quantized(inner) else p.dtype
            self.register_parameter(
                f"{attr}_delta",
                nn.Parameter(torch.zeros(idx.numel(), device=p.device, dtype=dtype)),
            )

    def _delta(self, attr: str) -> tuple[Tensor, Tensor]:
        return getattr(self, f"{attr}_delta"), getattr(self, f"{attr}_idx")

    def _dense(self, attr: str, base: Tensor) -> Tensor:
        delta, idx = self._delta(attr)
        return base + torch.zeros_like(base).view(-1).index_add(
            0, idx, delta.to(base.dtype)
        ).view_as(base)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.enabled or self.merged:
            return self.base_layer(*args, **kwargs)
        inner = self.base_layer
        if is_quantized(inner):
            return self._forward_quantized(inner, args[0])
        if (
            isinstance(inner, nn.Linear)
            and self.param_names in (["weight"], ["bias", "weight"])
            and not inner.weight.requires_grad
        ):
            bias = self._dense("bias", inner.bias) if "bias" in self.param_names else inner.bias
            delta, idx = self._delta("weight")
            x = args[0]
            if x.dtype == inner.weight.dtype and not torch.is_autocast_enabled(x.device.type):
                return _SparseLinearFunction.apply(x, inner.weight, bias, delta, idx)
        params = {a: self._dense(a, getattr(unwrap(inner), a)) for a in self.param_names}
        if inner is unwrap(inner):
            return functional_call(inner, params, args, kwargs, strict=False)
        raise PlanError(
            "sparse tuning of a module that is already wrapped by another method is not supported"
        )

    def _forward_quantized(self, inner: nn.Module, x: Tensor) -> Tensor:
        """A 4-bit/8-bit base: its output plus the sparse update ``x S^T`` (never densified)."""
        if "bias" in self.param_names:
            bias = inner.bias
            assert isinstance(bias, Tensor)
            y = functional_call(inner, {"bias": self._dense("bias", bias)}, (x,))
        else:
            y = inner(x)
        if "weight" not in self.param_names:
            return y
        delta, idx = self._delta("weight")
        in_f, out_f = dims(inner)
        x2 = x.reshape(-1, in_f).to(delta.dtype)
        upd = _spmm(idx // in_f, idx % in_f, delta, (out_f, in_f), x2.t()).t()
        return y + upd.reshape(*x.shape[:-1], out_f).to(y.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        inner = unwrap(self.base_layer)
        refuse_merge(inner, "sparse deltas")
        for a in self.param_names:
            delta, idx = self._delta(a)
            getattr(inner, a).view(-1).index_add_(0, idx, delta)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        inner = unwrap(self.base_layer)
        for a in self.param_names:
            delta, idx = self._delta(a)
            getattr(inner, a).view(-1).index_add_(0, idx, -delta)
        self.merged = False

    def extra_repr(self) -> str:
        return ", ".join(f"{a}: {self._delta(a)[0].numel()} positions" for a in self.param_names)


@register_method(Sparse, order=2, in_run_config=False)
def inject_sparse(model: nn.Module, entry: PlanEntry, plan: Plan) -> None:
    keys: dict[str, str] = entry.settings["params"]
    missing = [k for k in keys.values() if k not in plan.tensors]
    if missing:
        raise PlanError(f"sparse entry {entry.target!r} refers to missing index tensors {missing}")
    module = get_module(model, entry.target)
    set_module(
        model, entry.target, SparseLayer(module, {a: plan.tensors[k] for a, k in keys.items()})
    )
