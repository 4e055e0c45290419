"""A finished run directory vouches for its files: ``digests.json`` holds the sha256 of
``config.yaml``, ``results.json`` and the adapter's files, written last; :func:`check_run`
(called by :func:`slimtune.app.rebuild.rebuild`, so by ``eval``, ``export`` and ``info``)
refuses a run whose files changed or went missing since. A run written before digests existed
has no ``digests.json`` and is not checked."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import LoadError
from ..io import atomic_write_text
from ..io.digests import file_digest
from ..io.files import group_file

__all__ = ["DIGESTS", "RUN_FILES", "check_run", "write_run_digests"]

DIGESTS = "digests.json"
RUN_FILES = ("config.yaml", "results.json", "adapter/slimtune.json", "adapter/adapter.safetensors")


def _file(run: Path, name: str) -> Path:
    folder, _, base = name.rpartition("/")
    return group_file(run / folder, base) if folder else run / name


def write_run_digests(run: Path) -> None:
    """Write ``digests.json`` for the run's files that exist (call it last)."""
    files = {n: file_digest(_file(run, n)) for n in RUN_FILES if _file(run, n).is_file()}
    atomic_write_text(run / DIGESTS, json.dumps({"sha256": files}, indent=1))


def check_run(run: Path) -> None:
    """Refuse a run directory whose files differ from its ``digests.json``.

    Raises:
        LoadError: naming the file that changed or is missing, and how to accept it.
    """
    path = run / DIGESTS
    if not path.is_file():
        return
    try:
        want = json.loads(path.read_text(encoding="utf-8"))["sha256"]
        if not isinstance(want, dict):
            raise TypeError("sha256 must be an object")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise LoadError(f"{path}: unreadable ({exc})") from exc
    for name, digest in want.items():
        f = _file(run, str(name))
        if not f.is_file():
            raise LoadError(f"{run}: {name} is missing (it was part of the finished run)")
        if file_digest(f) != digest:
            raise LoadError(
                f"{run}: {name} changed since the run was written (its sha256 differs from "
                f"{DIGESTS}); if the change is on purpose, delete {path}"
            )
