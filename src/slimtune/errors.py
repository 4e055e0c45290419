"""Exceptions raised by slimtune: every message names the offending value and what is valid."""

from __future__ import annotations

__all__ = ["SlimtuneError", "TargetError", "PlanError", "LoadError", "ExportError", "finite"]


class SlimtuneError(Exception):
    """Base class of every error slimtune raises on purpose."""


class TargetError(SlimtuneError, ValueError):
    """A target (role or regular expression) matched nothing, or matched something unusable."""


class PlanError(SlimtuneError, ValueError):
    """A plan or method configuration is invalid."""


class LoadError(SlimtuneError):
    """A saved adapter cannot be loaded: corrupted, truncated, foreign, or for another base."""


class ExportError(SlimtuneError):
    """A model cannot be exported in the requested format."""


def finite(where: str, value: object, *, low: float | None = None, above: bool = False) -> float:
    """``value`` as a finite float, or a :class:`PlanError` naming ``where``.

    ``low``: the smallest value allowed (``above=True``: values must be greater than it).
    """
    import math

    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PlanError(f"{where} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise PlanError(f"{where} must be a finite number, got {value!r}")
    if low is not None and (v <= low if above else v < low):
        raise PlanError(f"{where} must be {'>' if above else '>='} {low:g}, got {value!r}")
    return v
