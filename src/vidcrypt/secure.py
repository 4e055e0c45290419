"""`secure` mode: RSA-OAEP key wrapping + chunked AES-256-GCM streaming.

The input file's bytes (the whole AVI, so decryption restores it exactly, both streams and all
metadata) are cut into chunks of ``chunk_size`` bytes. Chunk ``i`` is sealed with AES-256-GCM
under a fresh random per-file key, nonce = ``stream_id (u32) || i (u64)`` and
AAD = ``b"vidcrypt/1" || SHA-256(header) || stream_id || i || final``. Body records are
``flags (u8, 1 = final) | length (u32) | ciphertext+tag``. Reordering, truncation, appending,
bit flips and header edits all make a tag fail.

Speed and memory: chunks are sealed/opened by :func:`~vidcrypt.pipeline.default_workers`
threads (pyca/cryptography's AES-GCM, file reads and writes all release the GIL). A regular
input file is read in place through a read-only memory map, one window of ``_WINDOW`` (16 MiB)
per worker, so its bytes are not copied into a buffer first; its size is taken when the
operation starts. Other inputs (pipes) are read in order into a buffer. Each output record is
written at its offset with one ``os.pwritev``. Memory is bounded whatever the file size: per
worker one output buffer of a chunk, plus a mapped window of at most 16 MiB + a chunk
(page-cache pages, shared and reclaimable) or an input buffer of a chunk. As with any mmap
reader, truncating the input while it is being read kills the process with SIGBUS (nothing
appears under the output name, but its ``.part`` temporary file is left behind).
"""

from __future__ import annotations

import base64
import hashlib
import mmap
import os
import stat
import struct
import time
from dataclasses import dataclass
from io import BufferedReader
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .container import MODE_SECURE, Preamble, atomic_output, write_preamble
from .errors import ConfigError, IntegrityError, UnsupportedFileError, VidcryptError
from .keys import fingerprint, unwrap_key, wrap_key
from .pipeline import OrderedWorkers, default_workers

__all__ = ["SecureConfig", "encrypt_file", "decrypt_file", "nonce", "aad", "STREAM_FILE"]

STREAM_FILE = 0
TAG = 16
_REC = struct.Struct(">BI")
_DOMAIN = b"vidcrypt/1"
# Memory-map regular input files where the platform allows it (see the module docstring).
_MMAP = hasattr(mmap, "MAP_SHARED") and hasattr(mmap, "PROT_READ")
_WINDOW = 16 << 20  # bytes mapped at a time per worker (a multiple of the page size)


@dataclass(frozen=True)
class SecureConfig:
    """Secure mode settings.

    Attributes:
        chunk_size: Plaintext bytes per authenticated chunk (1 KiB to 64 MiB); bounds memory.
    """

    chunk_size: int = 1 << 20

    def __post_init__(self) -> None:
        if not (1 << 10) <= self.chunk_size <= (1 << 26):
            raise ConfigError(f"chunk_size must be in [1 KiB, 64 MiB], got {self.chunk_size}")


def nonce(stream_id: int, index: int) -> bytes:
    """The 96-bit GCM nonce of chunk ``index`` of stream ``stream_id`` (unique per key)."""
    return struct.pack(">IQ", stream_id, index)


def aad(header_hash: bytes, stream_id: int, index: int, final: bool) -> bytes:
    """Associated data binding a chunk to the header, its stream, position and final flag."""
    return _DOMAIN + header_hash + struct.pack(">IQB", stream_id, index, int(final))


def encrypt_file(
    src: str | Path, dst: str | Path, public: rsa.RSAPublicKey, config: SecureConfig | None = None
) -> dict[str, Any]:
    """Encrypt ``src`` byte-for-byte into a vidcrypt secure container at ``dst``.

    Returns:
        Statistics: ``bytes_in``, ``bytes_out``, ``chunks``, ``seconds``.
    """
    cfg = config or SecureConfig()
    key = AESGCM.generate_key(bit_length=256)
    header = {
        "cipher": "AES-256-GCM",
        "wrap": "RSA-OAEP-SHA256",
        "chunk_size": cfg.chunk_size,
        "key_fingerprint": fingerprint(public),
        "wrapped_key": base64.b64encode(wrap_key(public, key)).decode(),
        "payload": "original file bytes",
    }
    t0 = time.perf_counter()
    with atomic_output(dst) as tmp, open(src, "rb") as fin, open(tmp, "wb") as fout:
        hh = hashlib.sha256(write_preamble(fout, MODE_SECURE, header)).digest()
        fout.flush()
        job = _Sealer(fin, fout.fileno(), fout.tell(), AESGCM(key), hh, cfg.chunk_size)
        pool = OrderedWorkers(job.claim, job.process, job.worker, default_workers(), _Worker.close)
        pool.run()
        n_out = os.fstat(fout.fileno()).st_size
    return {
        "bytes_in": job.bytes_in,
        "bytes_out": n_out,
        "chunks": pool.claimed,
        "seconds": time.perf_counter() - t0,
    }


def _map_size(fd: int) -> int | None:
    """The size of ``fd`` if it is a regular file that can be memory-mapped, else ``None``."""
    st = os.fstat(fd)
    return st.st_size if _MMAP and stat.S_ISREG(st.st_mode) else None


class _Window:
    """One worker's read-only memory map of a regular file, ``_WINDOW`` bytes at a time.

    Consecutive chunks usually fall in the current window, so the cost of ``mmap``/``munmap``
    calls (page tables, TLB shootdowns between the worker threads) is paid once per window
    rather than once per chunk. A chunk that crosses the window's end gets a longer window.
    """

    def __init__(self, fd: int, size: int, error: type[VidcryptError]) -> None:
        self.fd, self.size, self.error = fd, size, error
        self.map: mmap.mmap | None = None
        self.start = self.end = 0

    def view(self, offset: int, length: int) -> memoryview:
        """A view of ``length`` bytes at ``offset``; release it before the next call."""
        if self.map is None or not self.start <= offset <= offset + length <= self.end:
            self.close()
            start = offset - offset % _WINDOW
            end = min(self.size, max(start + _WINDOW, offset + length))
            try:
                self.map = mmap.mmap(
                    self.fd, end - start, mmap.MAP_SHARED, mmap.PROT_READ, offset=start
                )
            except ValueError as exc:  # the file is now shorter than when we started
                raise self.error(f"the input file shrank while being read: {exc}") from exc
            self.start, self.end = start, end
        with memoryview(self.map) as whole:
            return whole[offset - self.start : offset - self.start + length]

    def close(self) -> None:
        if self.map is not None:
            self.map.close()
            self.map = None


class _Worker:
    """One worker's memory: an output buffer, and a mapped window or an input buffer."""

    def __init__(
        self, out_size: int, in_size: int, fd: int, mapped: int | None, error: type[VidcryptError]
    ) -> None:
        self.out = bytearray(out_size)
        self.inp = bytearray(0 if mapped is not None else in_size)
        self.window = _Window(fd, mapped, error) if mapped is not None else None

    def input(self, offset: int, length: int) -> memoryview:
        """The input bytes at ``offset`` (mapped) or the first ``length`` bytes of the buffer."""
        if self.window is None:
            return memoryview(self.inp)[:length]
        return self.window.view(offset, length) if length else memoryview(b"")

    def close(self) -> None:
        if self.window is not None:
            self.window.close()


class _Sealer:
    """Claims chunks in order (``(length, final)``) and seals and writes them (process).

    Record ``i`` goes to ``base + i * (record size of a full chunk)``: every record but the
    final one holds a full chunk. A mapped input's chunks follow from its size; otherwise a
    chunk is read in order and is final when the input ends within or right after it: each
    read asks for one byte more than a chunk, and that byte starts the next chunk (``carry``).
    """

    def __init__(
        self, fin: BufferedReader, fd: int, base: int, gcm: AESGCM, hh: bytes, size: int
    ) -> None:
        self.fin, self.fd, self.base, self.gcm, self.hh, self.size = fin, fd, base, gcm, hh, size
        self.length = _map_size(fin.fileno())
        self.carry = b""
        self.ended = False
        self.bytes_in = 0

    def worker(self) -> _Worker:
        return _Worker(
            self.size + TAG, self.size + 1, self.fin.fileno(), self.length, UnsupportedFileError
        )

    def claim(self, w: _Worker, index: int) -> tuple[int, bool] | None:
        if self.ended:
            return None
        if self.length is not None:
            n = min(self.size, self.length - index * self.size)
            final = (index + 1) * self.size >= self.length
        else:
            view, keep = memoryview(w.inp), len(self.carry)
            view[:keep] = self.carry
            got = keep + _read_full(self.fin, view[keep:])
            final = got <= self.size
            self.carry = b"" if final else bytes(view[self.size :])
            n = got if final else self.size
        self.ended = final
        self.bytes_in += n
        return n, final

    def process(self, w: _Worker, index: int, item: tuple[int, bool]) -> None:
        n, final = item
        out = memoryview(w.out)[: n + TAG]
        with w.input(index * self.size, n) as data:
            self.gcm.encrypt_into(
                nonce(STREAM_FILE, index), data, aad(self.hh, STREAM_FILE, index, final), out
            )
        offset = self.base + index * (_REC.size + self.size + TAG)
        _pwrite_all(self.fd, [_REC.pack(int(final), n + TAG), out], offset)


def _pwrite_all(fd: int, parts: list[bytes | memoryview], offset: int) -> None:
    """Write ``parts`` one after the other at ``offset`` (retrying short writes)."""
    views = [memoryview(p) for p in parts if len(p)]
    while views:
        done = os.pwritev(fd, views, offset)
        offset += done
        while views and done >= len(views[0]):
            done -= len(views[0])
            views.pop(0)
        if views and done:
            views[0] = views[0][done:]


def _read_full(fin: BufferedReader, buf: bytearray | memoryview) -> int:
    """Read until ``buf`` is full or the file ends; the number of bytes read."""
    view, got = memoryview(buf), 0
    while got < len(buf):
        n = fin.readinto(view[got:])
        if not n:
            break
        got += n
    return got


class _Opener:
    """Claims body records ``flags | length | ciphertext`` in order, checking their framing,
    then opens them and writes each plaintext at its offset (process).

    A mapped input's records are read in place (only their 5-byte headers are read during
    the claim); otherwise each record is read into the worker's input buffer.
    """

    def __init__(
        self, fin: BufferedReader, start: int, fd: int, gcm: AESGCM, hh: bytes, chunk: int
    ) -> None:
        self.fin, self.fd, self.gcm, self.hh, self.chunk = fin, fd, gcm, hh, chunk
        self.length = _map_size(fin.fileno())
        self.pos = start  # file offset of the next record (mapped input)
        self.ended = False
        self.bytes_out = 0

    def worker(self) -> _Worker:
        return _Worker(self.chunk, self.chunk + TAG, self.fin.fileno(), self.length, IntegrityError)

    def _read(self, size: int) -> bytes:
        if self.length is None:
            return self.fin.read(size)
        data = os.pread(self.fin.fileno(), max(0, min(size, self.length - self.pos)), self.pos)
        self.pos += len(data)
        return data

    def claim(self, w: _Worker, index: int) -> tuple[int, bool, int, int] | None:
        if self.ended:
            if self._read(1):
                raise IntegrityError(f"unexpected data after the final chunk {index - 1}")
            return None
        rec = self._read(_REC.size)
        if len(rec) < _REC.size:
            raise IntegrityError(f"file is truncated: no final chunk after {index} chunks")
        flags, length = _REC.unpack(rec)
        if flags > 1 or not TAG <= length <= self.chunk + TAG:
            raise IntegrityError(f"chunk {index}: bad record (flags {flags}, length {length})")
        where = self.pos
        if self.length is not None:
            got = max(0, min(length, self.length - self.pos))
            self.pos += got
        else:
            got = _read_full(self.fin, memoryview(w.inp)[:length])
        if got != length:
            raise IntegrityError(f"file is truncated inside chunk {index}")
        self.ended = flags == 1
        offset = self.bytes_out
        self.bytes_out += length - TAG
        return length, flags == 1, where, offset

    def process(self, w: _Worker, index: int, item: tuple[int, bool, int, int]) -> None:
        length, final, where, offset = item
        out = memoryview(w.out)[: length - TAG]
        with w.input(where, length) as data:
            try:
                self.gcm.decrypt_into(
                    nonce(STREAM_FILE, index), data, aad(self.hh, STREAM_FILE, index, final), out
                )
            except InvalidTag as exc:
                raise IntegrityError(
                    f"chunk {index} failed authentication (tampered, reordered or truncated)"
                ) from exc
        _pwrite_all(self.fd, [out], offset)


def _parse_header(pre: Preamble) -> tuple[int, str, bytes]:
    h = pre.header
    try:
        chunk = int(h["chunk_size"])
        fp = str(h["key_fingerprint"])
        wrapped = base64.b64decode(h["wrapped_key"], validate=True)
        if h["cipher"] != "AES-256-GCM" or h["wrap"] != "RSA-OAEP-SHA256":
            raise ValueError(f"unknown cipher {h['cipher']!r} / wrap {h['wrap']!r}")
        SecureConfig(chunk)
    except (KeyError, TypeError, ValueError) as exc:
        raise IntegrityError(f"secure header is invalid: {exc}") from exc
    return chunk, fp, wrapped


def decrypt_file(
    src: str | Path, dst: str | Path, private: rsa.RSAPrivateKey, pre: Preamble
) -> dict[str, Any]:
    """Decrypt a secure container; ``dst`` appears only if every chunk authenticates.

    Args:
        src: The encrypted file.
        dst: Output path (written via a temporary file and renamed at the end).
        private: The recipient's private key.
        pre: The already parsed preamble of ``src``.

    Raises:
        WrongKeyError: the key does not match the file.
        IntegrityError: tampering, truncation, reordering or trailing data.
    """
    chunk, fp, wrapped = _parse_header(pre)
    key = unwrap_key(private, wrapped, fp)
    if len(key) != 32:
        raise IntegrityError(f"unwrapped file key has {len(key)} bytes, expected 32")
    hh = hashlib.sha256(pre.raw).digest()
    t0 = time.perf_counter()
    with atomic_output(dst) as tmp, open(src, "rb") as fin, open(tmp, "wb") as fout:
        fin.seek(pre.body_offset)
        job = _Opener(fin, pre.body_offset, fout.fileno(), AESGCM(key), hh, chunk)
        pool = OrderedWorkers(job.claim, job.process, job.worker, default_workers(), _Worker.close)
        pool.run()
    return {"bytes_out": job.bytes_out, "chunks": pool.claimed, "seconds": time.perf_counter() - t0}
