"""The vidcrypt file container and atomic output files.

Layout (all integers big-endian)::

    0   8 bytes  magic b"VIDCRYPT"
    8   u8       format version (1)
    9   u8       mode: 1 = secure, 2 = paper
    10  u32      header length H
    14  H bytes  header, UTF-8 JSON (mode-specific fields)
    14+H ...     body (mode-specific records)

The header bytes are authenticated in secure mode (their SHA-256 is in every chunk's AAD).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from .errors import IntegrityError, UnsupportedFileError

__all__ = [
    "MAGIC",
    "VERSION",
    "MODE_SECURE",
    "MODE_PAPER",
    "Preamble",
    "write_preamble",
    "read_preamble",
    "atomic_output",
    "read_exact",
]

MAGIC = b"VIDCRYPT"
VERSION = 1
MODE_SECURE = 1
MODE_PAPER = 2
_MODES = {MODE_SECURE: "secure", MODE_PAPER: "paper"}
_FIXED = struct.Struct(">8sBBI")
MAX_HEADER = 1 << 20


@dataclass(frozen=True)
class Preamble:
    """The parsed start of a vidcrypt file.

    Attributes:
        mode: ``"secure"`` or ``"paper"``.
        header: The decoded JSON header.
        raw: The exact header bytes (hashed into secure mode's AAD).
        body_offset: File offset of the first body byte.
    """

    mode: str
    header: dict[str, Any]
    raw: bytes
    body_offset: int


def write_preamble(fh: BinaryIO, mode: int, header: dict[str, Any]) -> bytes:
    """Write magic, version, mode and the JSON header; returns the header bytes."""
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    fh.write(_FIXED.pack(MAGIC, VERSION, mode, len(raw)))
    fh.write(raw)
    return raw


def read_exact(fh: BinaryIO, size: int, what: str) -> bytes:
    """Read exactly ``size`` bytes or raise :class:`IntegrityError` naming ``what``."""
    data = fh.read(size)
    if len(data) != size:
        raise IntegrityError(f"file is truncated: expected {size} bytes of {what}, got {len(data)}")
    return data


def read_preamble(fh: BinaryIO, path: str | Path = "input") -> Preamble:
    """Parse the start of a vidcrypt file.

    Raises:
        UnsupportedFileError: bad magic, unknown version or mode, or an unreadable header.
    """
    fixed = fh.read(_FIXED.size)
    if len(fixed) < _FIXED.size or not fixed.startswith(MAGIC):
        raise UnsupportedFileError(f"{path} is not a vidcrypt file (bad magic)")
    _, version, mode, hlen = _FIXED.unpack(fixed)
    if version != VERSION:
        raise UnsupportedFileError(f"{path}: unsupported vidcrypt format version {version}")
    if mode not in _MODES:
        raise UnsupportedFileError(f"{path}: unknown vidcrypt mode byte {mode}")
    if hlen > MAX_HEADER:
        raise UnsupportedFileError(f"{path}: header length {hlen} exceeds {MAX_HEADER}")
    raw = read_exact(fh, hlen, "header")
    try:
        header = json.loads(raw)
    except ValueError as exc:
        raise IntegrityError(f"{path}: header is not valid JSON") from exc
    if not isinstance(header, dict):
        raise IntegrityError(f"{path}: header is not a JSON object")
    return Preamble(_MODES[mode], header, raw, _FIXED.size + hlen)


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` only on success.

    On any exception the temporary file is removed, so nothing partial ever appears under
    the final name.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise
