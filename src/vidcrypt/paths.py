"""Where vidcrypt reads and writes: regular files only, ``-`` for standard input/output.

An input is read twice (probed, then encrypted), so a pipe or FIFO would lose what the first
read took (64 KiB) or hang: it is refused, and ``-`` spools standard input into a temporary
file first. An output never replaces what the user did not ask to replace: an existing file
only with ``force``, never the input or a key, never something that is not a regular file (a
device, a directory, a symlink), and standard output only through ``-``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import ConfigError

__all__ = ["STDIO", "check_input", "check_output", "spooled_input", "to_stdout"]

STDIO = "-"


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a pipe or FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def check_input(path: str | Path) -> Path:
    """``path`` if it is a regular file (followed through symlinks), else a clear error."""
    p = Path(path)
    try:
        st = os.stat(p)
    except OSError as exc:
        raise ConfigError(f"cannot read {p}: {exc.strerror}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(
            f"input {p} is {_kind(st.st_mode)}: vidcrypt reads its input twice (to check it, "
            f"then to convert it); give a regular file, or {STDIO} to read standard input"
        )
    return p


def check_output(
    path: str | Path, *, force: bool = False, protect: tuple[str | Path | None, ...] = ()
) -> Path:
    """``path`` if vidcrypt may write there, else a clear error (see the module docstring).

    ``protect``: files that must not be overwritten (the input, keys).
    """
    p = Path(path)
    for other in protect:
        if other is None or str(other) == STDIO:
            continue
        with contextlib.suppress(OSError):
            if p.exists() and Path(other).exists() and os.path.samefile(p, other):
                raise ConfigError(f"output {p} is one of the inputs ({other}); choose another name")
        if p.resolve() == Path(other).resolve():
            raise ConfigError(f"output {p} is one of the inputs ({other}); choose another name")
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return p
    if stat.S_ISLNK(st.st_mode):
        raise ConfigError(f"output {p} is a symbolic link; vidcrypt writes only regular files")
    if not stat.S_ISREG(st.st_mode):
        hint = f" (write to standard output with {STDIO})" if stat.S_ISCHR(st.st_mode) else ""
        raise ConfigError(f"output {p} is {_kind(st.st_mode)}{hint}")
    if not force:
        raise ConfigError(f"output {p} exists; pass --force to replace it")
    return p


@contextlib.contextmanager
def spooled_input(path: str | Path) -> Iterator[Path]:
    """A regular file holding the input: ``path`` itself, or standard input copied to a
    temporary file for ``-`` (removed afterwards)."""
    if str(path) != STDIO:
        yield check_input(path)
        return
    fd, tmp = tempfile.mkstemp(prefix="vidcrypt-stdin-", suffix=".bin")
    try:
        with os.fdopen(fd, "wb") as fh:
            shutil.copyfileobj(sys.stdin.buffer, fh, 1 << 20)
        yield Path(tmp)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


@contextlib.contextmanager
def to_stdout(path: str | Path) -> Iterator[Path]:
    """Where to write: ``path``, or for ``-`` a temporary file copied to standard output once
    it is complete (nothing reaches standard output on an error)."""
    if str(path) != STDIO:
        yield Path(path)
        return
    tmpdir = Path(tempfile.mkdtemp(prefix="vidcrypt-out-"))
    try:
        out = tmpdir / "out"
        yield out
        with open(out, "rb") as fh:
            shutil.copyfileobj(fh, sys.stdout.buffer, 1 << 20)
        sys.stdout.buffer.flush()
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
