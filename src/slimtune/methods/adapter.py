"""Bottleneck adapters: sequential (Houlsby / SPT-Adapter) and parallel (AdaptFormer).

::

    sequential:  h = f(x);   y = h + s · up(act(down(dropout(h))))
    parallel:    y = f(x) + s · up(act(down(dropout(r))))      r = residual stream entering the FFN

:meth:`Adapter.adaptformer` is the parallel form of AdaptFormer / Bi-AdaptFormer (ReLU, no
biases): ``x = x + mlp(norm2(x)) + s · up(relu(down(x)))``.

``up`` starts at zero, so a fresh adapter leaves the model unchanged. For the parallel form the
family names the pair (module whose *input* is read, module whose *output* receives the sum):
for ViT/DINOv2 the residual stream entering ``norm2`` and the output of ``layer_scale2``/``mlp``,
for BERT the input of ``intermediate`` and the output of ``output.dense``. On other models a
parallel adapter reads the input of its target and adds to the target's output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import PlanError, TargetError, finite
from ..families import Family, resolve_modules, role_regex
from ..linear import dims, float_dtype, is_linear
from ..plan import Plan, PlanEntry
from ..quant import QuantSpec, quantize
from .base import MethodConfig, QuantizedWeights, Wrapper, get_module, set_module, unwrap
from .registry import register_method

__all__ = ["Adapter", "AdapterLayer", "Tap"]

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "tanh": torch.tanh,
    "identity": lambda t: t,
}


@dataclass
class Adapter(MethodConfig):
    """Bottleneck adapter.

    Attributes:
        dim: bottleneck width (>= 1).
        targets: roles or regexes. Default: ``fc2`` (sequential) or the family's FFN (parallel).
        placement: ``sequential`` (after the target) or ``parallel`` (beside the FFN).
        scale: multiplier ``s`` of the adapter output.
        activation: one of gelu, relu, silu, tanh, identity.
        bias: whether down/up projections have biases.
        dropout: dropout probability on the adapter input.
        bits: weight precision of down/up (1, 2, 4, 8 or 32).
        criterion: quantization levels criterion (``l1`` or ``mse``).
    """

    name = "adapter"
    dim: int = 8
    targets: tuple[str, ...] | list[str] | None = None
    placement: str = "sequential"
    scale: float = 1.0
    activation: str = "gelu"
    bias: bool = True
    dropout: float = 0.0
    bits: int = 32
    criterion: str = "l1"

    def __post_init__(self) -> None:
        if not isinstance(self.dim, int) or self.dim < 1:
            raise PlanError(f"Adapter dim must be a positive integer, got {self.dim!r}")
        if self.placement not in ("sequential", "parallel"):
            raise PlanError(
                f"Adapter placement must be 'sequential' or 'parallel', got {self.placement!r}"
            )
        if self.activation not in ACTIVATIONS:
            raise PlanError(
                f"Adapter activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}"
            )
        if not 0.0 <= finite("Adapter dropout", self.dropout) < 1.0:
            raise PlanError(f"Adapter dropout must be in [0, 1), got {self.dropout!r}")
        finite("Adapter scale", self.scale)
        if isinstance(self.targets, str):
            self.targets = (self.targets,)
        if self.targets is not None:
            self.targets = tuple(self.targets)
        QuantSpec(self.bits, self.criterion)

    @classmethod
    def adaptformer(
        cls, dim: int = 32, scale: float = 0.1, bits: int = 32, **kwargs: Any
    ) -> Adapter:
        """The AdaptFormer form of Jie et al. (Bi-AdaptFormer when ``bits < 32``).

        ``x = x + mlp(norm2(x)) + s · up(relu(down(x)))``: parallel to every block's FFN,
        reading the residual stream, ReLU, no biases. Other fields can be passed as keywords.
        """
        settings: dict[str, Any] = {
            "placement": "parallel",
            "activation": "relu",
            "bias": False,
            **kwargs,
        }
        return cls(dim=dim, scale=scale, bits=bits, **settings)

    def plan(self, model: nn.Module, family: Family) -> Plan:
        settings = self.settings()
        if self.placement == "sequential" or self.targets is not None:
            targets = self.targets or ("fc2",)
            names = resolve_modules(model, family, targets, what="Adapter target")
            return Plan(
                entries=[PlanEntry("adapter", n, {**settings, "read": None}) for n in names]
            )
        if family.parallel_adapter is None:
            raise TargetError(
                f"a parallel adapter on a {family.name} model needs explicit targets "
                "(regexes of the modules whose input is read and whose output receives the sum)"
            )
        read_role, write_role = family.parallel_adapter
        entries = []
        for block in family.block_names(model):
            inside = [n for n, _ in model.named_modules() if n.startswith(block + ".")]
            reads = [n for n in inside if role_regex(family.roles[read_role]).fullmatch(n)]
            writes = [n for n in inside if role_regex(family.roles[write_role]).fullmatch(n)]
            if not reads or not writes:
                raise TargetError(
                    f"block {block!r} has no {read_role}/{write_role} modules for a parallel adapter"
                )
            # the last match: the norm right before the FFN (Gemma 3 has two candidates)
            entries.append(PlanEntry("adapter", writes[-1], {**settings, "read": reads[-1]}))
        return Plan(entries=entries)


def _features(module: nn.Module, side: str) -> int:
    """Input (``side='in'``) or output width of a module, found from its parameters."""
    m = unwrap(module)
    if is_linear(m):
        return dims(m)[0 if side == "in" else 1]
    if isinstance(m, nn.LayerNorm):
        return int(m.normalized_shape[-1])
    linears = [x for x in m.modules() if is_linear(x)]
    if linears:
        return dims(linears[0])[0] if side == "in" else dims(linears[-1])[1]
    vectors = [p for p in m.parameters() if p.dim() == 1]
    if vectors:
        return int(vectors[0].shape[0])
    raise TargetError(
        f"cannot tell the width of {type(m).__name__}: adapters need a Linear/LayerNorm-like target"
    )


class Tap(Wrapper):
    """Passes its input through unchanged and hands it to the parallel adapters reading it."""

    method = "tap"

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self._sinks: list[AdapterLayer] = []

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        for sink in self._sinks:
            sink._source = x
        return self.base_layer(x, *args, **kwargs)


class AdapterLayer(QuantizedWeights, Wrapper):
    """Adds a bottleneck adapter to the output of ``base_layer`` (see module docstring)."""

    method = "adapter"
    quantized_params = ("down.weight", "up.weight")

    def __init__(
        self,
        base_layer: nn.Module,
        dim: int,
        d_in: int,
        d_out: int,
        *,
        parallel: bool,
        scale: float = 1.0,
        activation: str = "gelu",
        bias: bool = True,
        dropout: float = 0.0,
        bits: int = 32,
        criterion: str = "l1",
    ) -> None:
        super().__init__(base_layer)
        inner = unwrap(base_layer)
        # the first floating parameter: a quantized base's weights hold integer codes
        p = next((q for q in inner.parameters() if q.is_floating_point()), None)
        w = getattr(inner, "weight", None)
        kw: dict[str, Any] = {}
        if p is not None:
            kw = {"device": p.device, "dtype": p.dtype}
        elif is_linear(inner) and isinstance(w, Tensor):  # a bias-less quantized linear
            kw = {"device": w.device, "dtype": float_dtype(inner)}
        self.parallel = parallel
        self.scale = float(scale)
        self.activation = activation
        self.dropout = float(dropout)
        self.quant = QuantSpec(bits, criterion)
        self.down = nn.Linear(d_in, dim, bias=bias, **kw)
        self.up = nn.Linear(dim, d_out, bias=bias, **kw)
        nn.init.kaiming_uniform_(self.down.weight, a=5**0.5)
        if bias:
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.bias)
        if self.quant.bits < 32:
            nn.init.trunc_normal_(self.up.weight, std=1e-3, a=-2e-3, b=2e-3)
        else:
            nn.init.zeros_(self.up.weight)
        self._source: Tensor | None = None

    def weights(self) -> tuple[Tensor, Tensor]:
        """Down and up weights as used in the forward pass (quantized when ``bits < 32``)."""
        if self.quant.bits >= 32:
            return self.down.weight, self.up.weight
        d = self.pinned("down.weight", self.down.weight)
        u = self.pinned("up.weight", self.up.weight)
        return (
            quantize(self.down.weight, self.quant) if d is None else d,
            quantize(self.up.weight, self.quant) if u is None else u,
        )

    def adapter(self, h: Tensor) -> Tensor:
        """The bottleneck branch ``s · up(act(down(dropout(h))))``."""
        wd, wu = self.weights()
        if self.dropout > 0:
            h = F.dropout(h, self.dropout, self.training)
        z = ACTIVATIONS[self.activation](F.linear(h, wd, self.down.bias))
        return F.linear(z, wu, self.up.bias) * self.scale

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.base_layer(*args, **kwargs)
        if not self.enabled:
            self._source = None
            return out
        h = out[0] if isinstance(out, tuple) else out
        if self.parallel:
            src = self._source if self._source is not None else args[0]
            self._source = None
            h = h + self.adapter(src)
        else:
            h = h + self.adapter(h)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    def extra_repr(self) -> str:
        kind = "parallel" if self.parallel else "sequential"
        return f"{kind}, scale={self.scale}, activation={self.activation}, bits={self.quant.bits}"


@register_method(Adapter, order=4)
def inject_adapter(model: nn.Module, entry: PlanEntry, plan: Plan) -> None:
    s = entry.settings
    target = get_module(model, entry.target)
    read = s.get("read")
    parallel = s.get("placement") == "parallel"
    source = get_module(model, read) if read else target
    d_in = _features(source, "in") if parallel else _features(target, "out")
    layer = AdapterLayer(
        target,
        int(s["dim"]),
        d_in,
        _features(target, "out"),
        parallel=parallel,
        scale=float(s.get("scale", 1.0)),
        activation=str(s.get("activation", "gelu")),
        bias=bool(s.get("bias", True)),
        dropout=float(s.get("dropout", 0.0)),
        bits=int(s.get("bits", 32)),
        criterion=str(s.get("criterion", "l1")),
    )
    set_module(model, entry.target, layer)
    if parallel and read:
        tap = get_module(model, read)
        if not isinstance(tap, Tap):
            tap = Tap(tap)
            set_module(model, read, tap)
        tap._sinks.append(layer)
