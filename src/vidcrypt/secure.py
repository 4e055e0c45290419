"""`secure` mode: RSA-OAEP key wrapping + chunked AES-256-GCM streaming.

The input file's bytes (the whole AVI, so decryption restores it exactly, both streams and all
metadata) are cut into chunks of ``chunk_size`` bytes. Chunk ``i`` is sealed with AES-256-GCM
under a fresh random per-file key, nonce = ``stream_id (u32) || i (u64)`` and
AAD = ``b"vidcrypt/1" || SHA-256(header) || stream_id || i || final``. Body records are
``flags (u8, 1 = final) | length (u32) | ciphertext+tag``. Reordering, truncation, appending,
bit flips and header edits all make a tag fail; memory use is O(chunk_size).
"""

from __future__ import annotations

import base64
import hashlib
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
from .errors import ConfigError, IntegrityError
from .keys import fingerprint, unwrap_key, wrap_key
from .pipeline import BufferedWriter, ReadAhead

__all__ = ["SecureConfig", "encrypt_file", "decrypt_file", "nonce", "aad", "STREAM_FILE"]

STREAM_FILE = 0
TAG = 16
_REC = struct.Struct(">BI")
_DOMAIN = b"vidcrypt/1"


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
    n_in = index = 0
    size = cfg.chunk_size
    with atomic_output(dst) as tmp, open(src, "rb") as fin, open(tmp, "wb") as fout:
        hh = hashlib.sha256(write_preamble(fout, MODE_SECURE, header)).digest()
        gcm = AESGCM(key)
        with (
            ReadAhead(lambda buf: (None, _read_full(fin, buf)), size) as reader,
            BufferedWriter(fout, size + TAG) as writer,
        ):
            chunks = iter(reader)
            _, cur, got = next(chunks)
            while True:
                if got < size:
                    final, nxt = True, None
                else:
                    _, nxt, n_next = next(chunks)
                    final = n_next == 0
                out = writer.buffer()
                gcm.encrypt_into(
                    nonce(STREAM_FILE, index),
                    memoryview(cur)[:got],
                    aad(hh, STREAM_FILE, index, final),
                    memoryview(out)[: got + TAG],
                )
                writer.submit(_REC.pack(int(final), got + TAG), out, got + TAG)
                reader.release(cur)
                n_in += got
                if final or nxt is None:
                    break
                cur, got, index = nxt, n_next, index + 1
        n_out = fout.tell()
    return {
        "bytes_in": n_in,
        "bytes_out": n_out,
        "chunks": index + 1,
        "seconds": time.perf_counter() - t0,
    }


def _read_full(fin: BufferedReader, buf: bytearray | memoryview) -> int:
    """Read until ``buf`` is full or the file ends; the number of bytes read."""
    view, got = memoryview(buf), 0
    while got < len(buf):
        n = fin.readinto(view[got:])
        if not n:
            break
        got += n
    return got


class _RecordReader:
    """Reads body records ``flags | length | ciphertext`` one at a time, checking their framing."""

    def __init__(self, fin: BufferedReader, chunk: int) -> None:
        self.fin, self.chunk, self.index, self.ended = fin, chunk, 0, False

    def __call__(self, buf: bytearray) -> tuple[object, int]:
        if self.ended:
            if self.fin.read(1):
                raise IntegrityError(f"unexpected data after the final chunk {self.index - 1}")
            return None, 0
        rec = self.fin.read(_REC.size)
        if len(rec) < _REC.size:
            raise IntegrityError(f"file is truncated: no final chunk after {self.index} chunks")
        flags, length = _REC.unpack(rec)
        if flags > 1 or not TAG <= length <= self.chunk + TAG:
            raise IntegrityError(f"chunk {self.index}: bad record (flags {flags}, length {length})")
        if _read_full(self.fin, memoryview(buf)[:length]) != length:
            raise IntegrityError(f"file is truncated inside chunk {self.index}")
        self.index += 1
        self.ended = flags == 1
        return flags == 1, length


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
    gcm = AESGCM(key)
    hh = hashlib.sha256(pre.raw).digest()
    t0 = time.perf_counter()
    n_out = index = 0
    with atomic_output(dst) as tmp, open(src, "rb") as fin, open(tmp, "wb") as fout:
        fin.seek(pre.body_offset)
        with (
            ReadAhead(_RecordReader(fin, chunk), chunk + TAG) as reader,
            BufferedWriter(fout, chunk) as writer,
        ):
            for final, ct, length in reader:
                if length == 0:
                    break
                out = writer.buffer()
                try:
                    gcm.decrypt_into(
                        nonce(STREAM_FILE, index),
                        memoryview(ct)[:length],
                        aad(hh, STREAM_FILE, index, bool(final)),
                        memoryview(out)[: length - TAG],
                    )
                except InvalidTag as exc:
                    raise IntegrityError(
                        f"chunk {index} failed authentication (tampered, reordered or truncated)"
                    ) from exc
                reader.release(ct)
                writer.submit(b"", out, length - TAG)
                n_out += length - TAG
                index += 1
        index -= 1
    return {"bytes_out": n_out, "chunks": index + 1, "seconds": time.perf_counter() - t0}
