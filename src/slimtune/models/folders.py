"""Converted model folders in the cache, written atomically.

A conversion is built in a temporary sibling folder and renamed into place only when it is
complete, so a reader sees either no folder or a finished one; a stale or unfinished folder
(``is_valid`` false) is replaced, and a folder another process finished meanwhile is kept.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["atomic_folder"]


@contextlib.contextmanager
def atomic_folder(out_dir: Path, is_valid: Callable[[Path], bool]) -> Iterator[Path]:
    """Yield a temporary sibling of ``out_dir`` to fill; on success rename it to ``out_dir``.

    On an exception nothing is left: neither ``out_dir`` (unless it was there before) nor the
    temporary folder.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists() and not is_valid(out_dir):
            shutil.rmtree(out_dir, ignore_errors=True)  # stale, unfinished or of another source
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if not is_valid(out_dir):  # not a concurrent winner: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
