"""Exceptions raised by slimtune: every message names the offending value and what is valid."""

from __future__ import annotations

__all__ = ["SlimtuneError", "TargetError", "PlanError", "LoadError", "ExportError"]


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
