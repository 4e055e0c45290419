"""apply / apply_plan / remove, merge / unmerge, and summary: the heart of the public API."""

from __future__ import annotations

import hashlib
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import PlanError
from .families import FAMILIES, GENERIC, Family, detect_family, resolve_modules
from .linear import is_linear
from .methods import METHODS
from .methods.base import MethodConfig, Wrapper, set_module, unwrap
from .plan import Plan, PlanEntry
from .qbase.layers import Int8Embedding, logical_shape, refuse_merge

__all__ = [
    "State",
    "apply",
    "apply_plan",
    "remove",
    "get_state",
    "merge",
    "unmerge",
    "summary",
    "Summary",
    "family_of",
    "fingerprint",
    "quantized_head",
    "method_parameters",
    "wrappers",
]


@dataclass
class State:
    """What slimtune did to a model (stored on it as ``model._slimtune``)."""

    plan: Plan
    fingerprint: dict[str, Any]
    added_biases: list[str] = field(default_factory=list)


def get_state(model: nn.Module) -> State:
    """The :class:`State` of a model that went through :func:`apply` or :func:`load`."""
    state = getattr(model, "_slimtune", None)
    if not isinstance(state, State):
        raise PlanError(
            "this model has no slimtune methods: call slimtune.apply(model, [...]) first"
        )
    return state


def fingerprint(model: nn.Module, exclude: Sequence[str] = ()) -> dict[str, Any]:
    """An identity of a model's weights: names/shapes hash, a strided value sample (``weights``,
    what adapters saved before ``values`` existed are checked against) and a checksum of every
    value (``values``, :func:`value_sum`: any changed value changes it).
    Parameters under the module names in ``exclude`` (the task head) are left out. A quantized
    base (:func:`slimtune.quantize_base`) is described by its logical shapes, a sample of its
    stored codes, and ``quant``: how it is quantized (``None`` for a float base).
    """
    from .qbase import base_quant, base_tensors

    shapes = hashlib.sha256()
    values = hashlib.sha256()
    full = hashlib.sha256()
    dtypes: set[str] = set()
    count = 0
    for name, p, shape in sorted(base_tensors(model), key=lambda t: t[0]):
        if any(name == e or name.startswith(e + ".") for e in exclude):
            continue
        count += shape.numel()
        shapes.update(f"{name}:{tuple(shape)};".encode())
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 1024)
        sample = flat[::step][:1024].float().cpu().numpy()
        values.update(sample.round(5).tobytes())
        full.update(f"{name}:{value_sum(p)};".encode())
        dtypes.add(str(p.dtype).removeprefix("torch."))
    quant = base_quant(model)
    return {
        "params": count,
        "structure": shapes.hexdigest()[:16],
        "weights": values.hexdigest()[:16],
        "values": full.hexdigest()[:16],
        "dtypes": sorted(dtypes),
        "quant": None if quant is None else quant.to_dict(),
    }


_CHUNK = 1 << 21
_MULTIPLIERS: dict[str, torch.Tensor] = {}


def _signed(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


def _lsr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 words (torch's ``>>`` is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _multipliers(device: torch.device) -> torch.Tensor:
    """A fixed sequence of odd 64-bit multipliers: splitmix64 of 1, 2, ... computed with
    integer arithmetic only, so it is the same on every machine and torch version."""
    key = str(device)
    if key not in _MULTIPLIERS:
        z = torch.arange(1, _CHUNK + 1, dtype=torch.int64) * _signed(0x9E3779B97F4A7C15)
        z = (z ^ _lsr(z, 30)) * _signed(0xBF58476D1CE4E5B9)
        z = (z ^ _lsr(z, 27)) * _signed(0x94D049BB133111EB)
        _MULTIPLIERS[key] = ((z ^ _lsr(z, 31)) | 1).to(device)
    return _MULTIPLIERS[key]


def value_sum(t: torch.Tensor) -> int:
    """A checksum of every value of ``t``: its bytes read as 64-bit words, each times a fixed
    odd number, summed modulo 2**64 chunk by chunk (the last bytes padded with zeros). Any change
    of one value changes it. It reads the tensor once: on this project's 2-core machine 134M
    fp32 values (536 MB) take 0.16 s and in bf16 0.05 s, 3-5 GB/s (a 7B model in bf16, 14 GB,
    in about 3-5 s)."""
    flat = t.detach().reshape(-1)
    if flat.numel() == 0:
        return 0
    raw = flat.contiguous().view(torch.uint8)
    if raw.storage_offset() % 8:  # 64-bit words need an aligned start
        raw = raw.clone()
    n = raw.numel() // 8 * 8
    words = raw[:n].view(torch.int64)
    if n < raw.numel():
        tail = torch.zeros(8, dtype=torch.uint8, device=raw.device)
        tail[: raw.numel() - n] = raw[n:]
        words = torch.cat([words, tail.view(torch.int64)])
    mult = _multipliers(words.device)
    out = 0
    for start in range(0, words.numel(), _CHUNK):
        part = words[start : start + _CHUNK]
        s = int((part * mult[: part.numel()]).sum()) & 0xFFFFFFFFFFFFFFFF
        out = (out * 0x9E3779B97F4A7C15 + s + 1) & 0xFFFFFFFFFFFFFFFF
    return out


def _resolve_family(model: nn.Module, family: Family | str | None) -> Family:
    if family is None:
        return detect_family(model)
    if isinstance(family, Family):
        return family
    if family == GENERIC.name:
        return GENERIC
    if family not in FAMILIES:
        raise PlanError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}, generic")
    return FAMILIES[family]


def family_of(model: nn.Module) -> Family:
    """The family of ``model``: the one its plan was made for when slimtune methods are applied
    (looked up once, by :func:`apply`), else detected from its blocks."""
    state = getattr(model, "_slimtune", None)
    if isinstance(state, State) and state.plan.family in FAMILIES:
        return FAMILIES[state.plan.family]
    return detect_family(model)


def apply(
    model: nn.Module,
    methods: Sequence[MethodConfig] | MethodConfig,
    *,
    head: Sequence[str] | str | None = None,
    head_bits: int = 32,
    family: Family | str | None = None,
) -> nn.Module:
    """Freeze ``model`` and add the given methods; the task head stays trainable.

    Args:
        model: any PyTorch model (modified in place and returned).
        methods: method configurations, e.g. ``[LoRA(r=8, targets=["q", "v"]), BitFit()]``.
        head: roles/regexes of the always-trainable head; default: the family's ``head`` role
            when the model has one, else nothing.
        head_bits: below 32, every linear layer of the head is trained and stored with its
            weight at this precision and without bias (Bi-Head; see
            :class:`~slimtune.methods.head.Head` for other settings).
        family: force a backbone family (default: detected from the model's blocks).

    Returns:
        The same model, with the plan stored on it (``slimtune.get_state(model).plan``).
    """
    if isinstance(methods, MethodConfig):
        methods = [methods]
    if getattr(model, "_slimtune", None) is not None:
        raise PlanError(
            "slimtune methods are already applied to this model; start from a fresh base model"
        )
    fam = _resolve_family(model, family)
    plan = Plan(family=fam.name)
    extra_head: list[str] = []
    for m in methods:
        if not isinstance(m, MethodConfig):
            raise PlanError(
                f"expected a method configuration (LoRA, Adapter, ...), got {type(m).__name__}"
            )
        _warn_whole_fused(m, fam)
        part = m.plan(model, fam)
        plan.entries += part.entries
        plan.tensors.update(part.tensors)
        extra_head += part.head
    if head is None:
        plan.head = fam.role_names(model, "head") if "head" in fam.roles else []
        if not plan.head and not extra_head and "lm_head" not in fam.roles:
            _warn_no_head(model, fam)
    else:
        plan.head = resolve_modules(
            model, fam, [head] if isinstance(head, str) else list(head), what="head"
        )
    plan.head += [h for h in dict.fromkeys(extra_head) if h not in plan.head]
    if head_bits != 32:
        plan.entries += quantized_head(model, plan, head_bits)
    return apply_plan(model, plan)


_HEAD_NAMES = re.compile(r"(?:^|\.)(?:classifier|score|head|lm_head|fc|out|output|logits)$")


def _warn_whole_fused(method: MethodConfig, family: Family) -> None:
    """Warn when a method other than LoRA is given a role that is part of a fused linear."""
    targets = getattr(method, "targets", None) or ()
    parts = sorted(t for t in targets if isinstance(t, str) and t in family.fused)
    if parts and method.name != "lora":
        warnings.warn(
            f"{method.name}: {', '.join(parts)} {'is' if len(parts) == 1 else 'are'} part of a "
            f"fused linear in the {family.name} family; only LoRA updates a part, so "
            f"{method.name} trains the whole fused layer",
            stacklevel=4,
        )


def _warn_no_head(model: nn.Module, family: Family) -> None:
    """Warn that no task head was found, naming the modules that look like one."""
    linears = [n for n, m in model.named_modules() if n and is_linear(m)]
    named = [n for n in linears if _HEAD_NAMES.search(n)]
    candidates = named or linears[-1:]
    hint = (
        f"candidates: {', '.join(candidates[:5])}; pass head=... to apply() to train one"
        if candidates
        else "the model has no linear layer that could be one"
    )
    warnings.warn(
        f"no task head found in this {family.name} model, so nothing outside the methods will "
        f"be trained ({hint}, or head=[] to silence this)",
        stacklevel=3,
    )


def quantized_head(model: nn.Module, plan: Plan, bits: int) -> list[PlanEntry]:
    """Plan entries quantizing every linear layer of the plan's head to ``bits`` (Bi-Head)."""
    from .methods.head import head_entries
    from .quant import QuantSpec

    QuantSpec(bits)
    done = {e.target for e in plan.entries if e.method == "head"}
    names = []
    for h in plan.head:
        module = model.get_submodule(h)
        for sub, m in module.named_modules():
            name = f"{h}.{sub}" if sub else h
            if isinstance(m, nn.Linear) and name not in done:
                names.append(name)
    if not names and not done:
        raise PlanError(
            f"head_bits={bits} needs a linear task head, but the head {plan.head} has no nn.Linear"
        )
    return head_entries(names, bits)


def apply_plan(model: nn.Module, plan: Plan) -> nn.Module:
    """Apply a :class:`Plan` to a base model: freeze it, then add each entry's method.

    If any entry fails, the model is restored to its base state before the error propagates.
    """
    if getattr(model, "_slimtune", None) is not None:
        raise PlanError(
            "slimtune methods are already applied to this model; start from a fresh base model"
        )
    for e in plan.entries:
        if e.method not in METHODS:
            raise PlanError(
                f"plan entry for {e.target!r} uses unknown method {e.method!r}; known: {sorted(METHODS)}"
            )
    fp = fingerprint(model, exclude=plan.head)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    state = State(plan=plan, fingerprint=fp)
    model._slimtune = state  # type: ignore[assignment]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for name in plan.head:
            for p in model.get_submodule(name).parameters():
                p.requires_grad_(True)
        # in the registry's order: parameter-level methods first (they address tensors by
        # their original names, before wrappers rename them)
        for e in sorted(plan.entries, key=lambda e: METHODS[e.method].order):
            METHODS[e.method].inject(model, e, plan)
        # new wrappers (and their parts) follow the mode of the layer they wrap: a model in
        # eval() stays in eval (no LoRA dropout at inference after slimtune.load)
        for _, w in wrappers(model):
            w.train(unwrap(w).training)
    except Exception:
        remove(model)
        for n, p in model.named_parameters():
            p.requires_grad_(grads.get(n, True))
        raise
    return model


def wrappers(model: nn.Module) -> Iterator[tuple[str, Wrapper]]:
    """All slimtune wrapper modules of a model, outermost first."""
    for name, module in model.named_modules():
        if isinstance(module, Wrapper):
            yield name, module


def remove(model: nn.Module) -> nn.Module:
    """Take every slimtune method out again (unmerging first) and return the base model."""
    state = getattr(model, "_slimtune", None)
    for _name, w in reversed(list(wrappers(model))):
        if w.merged:
            w.unmerge()
    # Replace wrappers by their innermost base layers, outermost first, until none is left
    # (wrappers can sit inside other wrappers' base layers, e.g. a tap inside a prompted block).
    while True:
        found = next(wrappers(model), None)
        if found is None:
            break
        set_module(model, found[0], unwrap(found[1]))
    if isinstance(state, State):
        for name in state.added_biases:
            m = model.get_submodule(name)
            if isinstance(m, nn.Linear):
                m.register_parameter("bias", None)  # same as `m.bias = None`
    if "_slimtune" in model.__dict__:
        del model.__dict__["_slimtune"]
    return model


def merge(model: nn.Module) -> list[str]:
    """Fold every mergeable method (LoRA, sparse deltas) into the base weights.

    Returns:
        Names of wrappers that cannot be merged (adapters, prompts); they stay active.
    """
    get_state(model)
    for name, w in wrappers(model):  # refuse before folding anything (all or nothing)
        if w.mergeable and not w.merged:
            refuse_merge(unwrap(w), f"{w.method} at {name!r}")
    left = []
    for name, w in wrappers(model):
        if w.mergeable:
            w.merge()
        elif w.method not in ("tap",):
            left.append(name)
    return left


def unmerge(model: nn.Module) -> None:
    """Undo :func:`merge`."""
    get_state(model)
    for _, w in wrappers(model):
        if w.mergeable:
            w.unmerge()


def method_parameters(model: nn.Module) -> dict[str, str]:
    """Map every parameter name to the method that owns or trains it (``base`` if frozen).

    Wrapper-owned parameters belong to the wrapper's method; trainable base parameters to
    ``head``, ``bitfit`` or ``full`` according to the plan.
    """
    state = get_state(model)
    owner: dict[str, str] = {}
    modules = dict(model.named_modules())
    for name, p in model.named_parameters():
        parts = name.split(".")
        method = None
        for i in range(len(parts) - 1):
            prefix = ".".join(parts[: i + 1])
            mod = modules.get(prefix)
            if isinstance(mod, Wrapper) and parts[i + 1] != "base_layer":
                method = mod.method
        if method is None:
            if not p.requires_grad:
                method = "base"
            else:
                method = "trainable"
                plain = name.replace(".base_layer", "")
                for e in state.plan.entries:
                    if e.method == "bitfit" and plain == e.target + ".bias":
                        method = "bitfit"
                    elif e.method == "full" and (
                        plain == e.target or plain.startswith(e.target + ".")
                    ):
                        method = "full"
                for h in state.plan.head:
                    if plain.startswith(h + "."):
                        method = "head"
        owner[name] = method
    return owner


@dataclass
class Summary:
    """Trainable parameters per method, in total, and as a percentage of the base model."""

    by_method: dict[str, int]
    trainable: int
    base: int

    @property
    def pct(self) -> float:
        return 100.0 * self.trainable / max(self.base, 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "by_method": self.by_method,
            "trainable": self.trainable,
            "base": self.base,
            "pct": self.pct,
        }

    def __str__(self) -> str:
        rows = [f"{'method':<10} {'trainable':>12} {'% of base':>10}"]
        for m, n in sorted(self.by_method.items()):
            rows.append(f"{m:<10} {n:>12,} {100.0 * n / max(self.base, 1):>9.4f}%")
        rows.append(f"{'total':<10} {self.trainable:>12,} {self.pct:>9.4f}%")
        rows.append(f"{'base':<10} {self.base:>12,}")
        return "\n".join(rows)


def summary(model: nn.Module) -> Summary:
    """Count trainable parameters per method (see :class:`Summary`)."""
    state = get_state(model)
    owner = method_parameters(model)
    params = dict(model.named_parameters())
    by: dict[str, int] = {}
    added = {n + ".bias" for n in state.added_biases}
    base = 0
    for name, method in owner.items():
        p = params[name]
        plain = name.replace(".base_layer", "")
        is_added = method not in ("base", "head", "bitfit", "full", "trainable") or plain in added
        if not is_added:
            base += logical_shape(p).numel()
        if p.requires_grad:
            by[method] = by.get(method, 0) + p.numel()
    base += sum(  # int8 embedding tables (buffers) of a quantized base
        m.codes.numel() for m in model.modules() if isinstance(m, Int8Embedding)
    )
    return Summary(by_method=by, trainable=sum(by.values()), base=base)
