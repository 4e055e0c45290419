"""Atomic file writes: a temporary file in the same folder, then a rename.

Every file slimtune writes goes through :func:`atomic_write`, so a crash leaves the old file or
the new one, never a half-written one.

Files that only make sense together (an adapter's manifest and weights, a checkpoint's state
and tensors) are written as a group by :func:`write_group`, so that a crash leaves the old
group or the new one, never one file of each::

    1. every file written in full as NAME.new (atomically)
    2. the commit marker .slimtune-commit written (atomically): the new group is complete
    3. each NAME.new renamed onto NAME
    4. the marker removed

A reader (:func:`group_file`) that finds the marker reads ``NAME.new`` where it still exists
and ``NAME`` (renamed already) elsewhere: the new group. Without the marker it reads ``NAME``:
the old group (``.new`` files of a save that died before step 2 are ignored). The next
:func:`write_group` into the folder finishes an interrupted commit and removes leftovers
(``.new`` files and the temporary files of :func:`atomic_write`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "COMMIT_MARKER",
    "atomic_write",
    "atomic_write_text",
    "group_file",
    "write_bytes",
    "write_group",
]

COMMIT_MARKER = ".slimtune-commit"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path``.

    The file gets the permissions a plain ``open`` would give it (``0o666`` less the umask),
    not the owner-only mode of temporary files.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write a text file atomically."""

    def _w(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())

    atomic_write(path, _w)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _committed(folder: Path) -> list[str]:
    """The names a commit marker lists (the group whose renames may be under way)."""
    try:
        return (folder / COMMIT_MARKER).read_text(encoding="utf-8").split()
    except (FileNotFoundError, NotADirectoryError):
        return []


def group_file(folder: str | os.PathLike[str], name: str) -> Path:
    """The file to read for ``name`` of a group written by :func:`write_group` (see above)."""
    folder = Path(folder)
    if name in _committed(folder) and (folder / (name + ".new")).is_file():
        return folder / (name + ".new")
    return folder / name


def _recover(folder: Path, names: list[str]) -> None:
    """Finish a commit that a crash interrupted (the names its marker lists); remove what a
    crash before a commit left of ``names``."""
    marked = _committed(folder)
    if (folder / COMMIT_MARKER).exists():
        for n in marked:
            if (folder / (n + ".new")).is_file():
                os.replace(folder / (n + ".new"), folder / n)
        _fsync_dir(folder)
        (folder / COMMIT_MARKER).unlink(missing_ok=True)
    for n in names:
        (folder / (n + ".new")).unlink(missing_ok=True)
        for stale in folder.glob(f".{n}.*.tmp"):
            stale.unlink(missing_ok=True)
        for stale in folder.glob(f".{n}.new.*.tmp"):
            stale.unlink(missing_ok=True)
    for stale in folder.glob(f".{COMMIT_MARKER}.*.tmp"):
        stale.unlink(missing_ok=True)


def write_group(folder: str | os.PathLike[str], writers: dict[str, Callable[[str], None]]) -> None:
    """Write the files ``{name: write(tmp_path)}`` into ``folder`` as one group (see above)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = list(writers)
    _recover(folder, names)
    for n, write in writers.items():
        atomic_write(folder / (n + ".new"), write)
    _fsync_dir(folder)
    atomic_write_text(folder / COMMIT_MARKER, "\n".join(names) + "\n")
    _fsync_dir(folder)
    for n in names:
        os.replace(folder / (n + ".new"), folder / n)
    _fsync_dir(folder)
    (folder / COMMIT_MARKER).unlink()
    _fsync_dir(folder)


def write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` and flush it to disk (a writer for :func:`write_group`:
    serialise in memory, e.g. ``safetensors.torch.save``, so that no library leaves its own
    temporary file behind when the process is killed)."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
