"""Backbone families and target resolution (roles or regular expressions -> module names)."""

from __future__ import annotations

import difflib
import re

from torch import nn

from ..errors import TargetError
from .base import LINEAR_ROLES, BlockSpec, Encoder, Family, role_regex
from .decoders import GPT2, LLAMA, OPT
from .hf import BERT, VIT
from .tsvit import TSVIT

__all__ = [
    "Family",
    "BlockSpec",
    "Encoder",
    "LINEAR_ROLES",
    "FAMILIES",
    "GENERIC",
    "register_family",
    "detect_family",
    "resolve_modules",
    "role_regex",
]

GENERIC = Family(name="generic", block_types=(), roles={})
FAMILIES: dict[str, Family] = {
    "bert": BERT,
    "vit": VIT,
    "tsvit": TSVIT,
    "llama": LLAMA,
    "opt": OPT,
    "gpt2": GPT2,
}


def register_family(family: Family, *, first: bool = False) -> Family:
    """Add a family so :func:`detect_family` recognises it.

    Families are tried in registration order; ``first=True`` puts this one before the
    built-in ones (for a layout that a built-in family's structure would also match).
    See ``docs/families.md`` for a worked example.
    """
    if first:
        rest = {k: v for k, v in FAMILIES.items() if k != family.name}
        FAMILIES.clear()
        FAMILIES.update({family.name: family, **rest})
    else:
        FAMILIES[family.name] = family
    return family


def detect_family(model: nn.Module) -> Family:
    """Return the family of ``model`` (by its block classes or its structure), or
    :data:`GENERIC`."""
    for family in FAMILIES.values():
        if family.matches(model):
            return family
    return GENERIC


def _describe(names: list[str], limit: int = 40) -> str:
    """A compact listing of module names: digits collapsed so repeated blocks show once."""
    seen: list[str] = []
    for n in names:
        k = re.sub(r"\.\d+\.", ".N.", n)
        if k not in seen:
            seen.append(k)
    more = f" ... (+{len(seen) - limit} more)" if len(seen) > limit else ""
    return ", ".join(seen[:limit]) + more


def resolve_modules(
    model: nn.Module,
    family: Family,
    targets: list[str] | tuple[str, ...],
    *,
    kinds: tuple[type[nn.Module], ...] | None = None,
    what: str = "target",
) -> list[str]:
    """Resolve roles / regular expressions to module names, in model order, without duplicates.

    Args:
        model: the model whose modules are searched.
        family: the model's family (its roles are tried first).
        targets: role names (``"q"``) or regular expressions matched against the end of the
            module names (``r"attention\\.self\\.query"``).
        kinds: if given, only modules of these types count as matches.
        what: word used in error messages.

    Raises:
        TargetError: a target matches no module (the message lists the available names and
            roles) or is an invalid regular expression.
    """
    named = [(n, m) for n, m in model.named_modules() if n]
    if kinds is not None:
        named = [(n, m) for n, m in named if isinstance(m, kinds)]
    names = [n for n, _ in named]
    chosen: set[str] = set()
    for target in targets:
        if target in family.roles:
            pattern = role_regex(family.roles[target])
        else:
            try:
                pattern = role_regex(target)
            except re.error as exc:
                raise TargetError(
                    f"{what} {target!r} is not a valid regular expression: {exc}"
                ) from exc
        hits = [n for n in names if pattern.fullmatch(n)]
        if not hits:
            kind = " of type " + "/".join(k.__name__ for k in kinds) if kinds else ""
            roles = (
                ", ".join(sorted(family.roles)) or "none (generic model: use regular expressions)"
            )
            close = difflib.get_close_matches(target, list(family.roles) + names, n=3)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise TargetError(
                f"{what} {target!r} matches no module{kind} of this {family.name} model.{hint}\n"
                f"Roles of family {family.name!r}: {roles}.\n"
                f"Available modules{kind}: {_describe(names)}"
            )
        chosen.update(hits)
    return [n for n in names if n in chosen]
