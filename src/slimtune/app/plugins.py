"""The repository's own packages that are not installed: ``benchmarks`` and ``studies``.

They sit beside ``src/`` in a clone of the repository and import the library and the application,
never the other way round. The command line reaches them by name only when asked
(``slimtune bench NAME``, a study's run directory): :func:`repo_module` finds the repository (the
current folder or one above it, or the one this package was installed from in editable mode),
puts it on ``sys.path`` and imports the module.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

from ..errors import SlimtuneError

__all__ = ["PluginError", "repo_root", "repo_module"]


class PluginError(SlimtuneError):
    """A benchmark or study module cannot be found or imported."""


def _candidates() -> list[Path]:
    here = Path.cwd().resolve()
    return [here, *here.parents, Path(__file__).resolve().parents[3]]


def repo_root(package: str) -> Path:
    """The folder holding ``package/__init__.py`` (``benchmarks`` or ``studies``).

    Raises:
        PluginError: no such folder here, above here, or where slimtune was installed from.
    """
    for base in _candidates():
        if (base / package / "__init__.py").is_file():
            return base
    raise PluginError(
        f"the repository's {package}/ folder was not found (looked in the current folder, the "
        "folders above it and the repository slimtune was installed from): run from a clone "
        "of the slimtune repository"
    )


def repo_module(name: str) -> ModuleType:
    """Import ``name`` (``benchmarks.lightpeft``, ``studies.wheat``) from the repository."""
    package = name.split(".", 1)[0]
    root = str(repo_root(package))
    if root not in sys.path:
        sys.path.insert(0, root)
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name in (name, package):
            raise PluginError(f"no module {name!r} in {root}") from exc
        raise
