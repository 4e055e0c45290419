"""`secure` mode: exact round trip, tamper/truncation/reorder detection, wrong key, atomicity."""

from __future__ import annotations

import os
import struct
import threading
from pathlib import Path

import pytest

from vidcrypt import api, secure
from vidcrypt.container import read_preamble
from vidcrypt.errors import IntegrityError, UnsupportedFileError, VidcryptError, WrongKeyError
from vidcrypt.keys import load_private_key, load_public_key
from vidcrypt.secure import SecureConfig, decrypt_file, encrypt_file

_KEYS: dict[Path, object] = {}


def _decrypt(src: Path, dst: Path, priv: Path) -> dict:
    # Loading a PEM private key validates it (tens of ms): cache the loaded key.
    if priv not in _KEYS:
        _KEYS[priv] = load_private_key(priv)
    key = _KEYS[priv]
    with open(src, "rb") as fh:
        pre = read_preamble(fh, src)
    return decrypt_file(src, dst, key, pre)


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".part")]


@pytest.fixture()
def small_secure(keypair: tuple[Path, Path], tmp_path: Path) -> tuple[Path, bytes]:
    """A 2,100-byte plaintext in 1 KiB chunks (3 chunks) and its ciphertext path."""
    plain = bytes(range(256)) * 8 + b"x" * 52
    src = tmp_path / "plain.bin"
    src.write_bytes(plain)
    enc = tmp_path / "plain.vcr"
    stats = encrypt_file(src, enc, load_public_key(keypair[1]), SecureConfig(chunk_size=1024))
    assert stats["chunks"] == 3 and stats["bytes_in"] == len(plain)
    return enc, plain


def test_avi_round_trip_is_byte_exact(
    tiny_avi: Path, keypair: tuple[Path, Path], tmp_path: Path
) -> None:
    priv, pub = keypair
    enc, dec = tmp_path / "v.vcr", tmp_path / "v.avi"
    api.encrypt(tiny_avi, enc, pub)
    assert api.file_mode(enc) == "secure"
    assert tiny_avi.read_bytes() not in enc.read_bytes()
    api.decrypt(enc, dec, priv)
    assert dec.read_bytes() == tiny_avi.read_bytes()


def test_round_trip_of_chunk_boundary_sizes(keypair: tuple[Path, Path], tmp_path: Path) -> None:
    src = tmp_path / "p.bin"
    enc, out = tmp_path / "p.vcr", tmp_path / "out.bin"
    for size, chunks in ((2048, 2), (0, 1), (1, 1), (1025, 2)):
        src.write_bytes(b"\x01" * size)
        stats = encrypt_file(src, enc, load_public_key(keypair[1]), SecureConfig(1024))
        assert stats["chunks"] == chunks
        _decrypt(enc, out, keypair[0])
        assert out.read_bytes() == b"\x01" * size


def test_every_single_byte_flip_is_detected(
    small_secure: tuple[Path, bytes], keypair: tuple[Path, Path], tmp_path: Path
) -> None:
    enc, plain = small_secure
    data = enc.read_bytes()
    out = tmp_path / "out.bin"
    for pos in range(len(data)):
        bad = bytearray(data)
        bad[pos] ^= 0x01 if pos % 2 else 0x80
        enc.write_bytes(bytes(bad))
        with pytest.raises(VidcryptError):
            _decrypt(enc, out, keypair[0])
        assert not out.exists(), f"output written after flipping byte {pos}"
    assert _leftovers(tmp_path) == []
    enc.write_bytes(data)
    _decrypt(enc, out, keypair[0])
    assert out.read_bytes() == plain


def _records(data: bytes, offset: int) -> list[bytes]:
    recs = []
    while offset < len(data):
        _, length = struct.unpack(">BI", data[offset : offset + 5])
        recs.append(data[offset : offset + 5 + length])
        offset += 5 + length
    return recs


def test_truncation_reordering_and_appending_are_detected(
    small_secure: tuple[Path, bytes], keypair: tuple[Path, Path], tmp_path: Path
) -> None:
    enc, _ = small_secure
    data = enc.read_bytes()
    with open(enc, "rb") as fh:
        body = read_preamble(fh).body_offset
    head, recs = data[:body], _records(data, body)
    assert len(recs) == 3
    variants = {
        "drop final chunk": head + recs[0] + recs[1],
        "drop middle chunk": head + recs[0] + recs[2],
        "swap chunks": head + recs[1] + recs[0] + recs[2],
        "duplicate chunk": head + recs[0] + recs[0] + recs[1] + recs[2],
        "appended data": data + b"\x00",
        "truncated mid-chunk": data[: len(data) - 7],
        "header only": head,
    }
    out = tmp_path / "out.bin"
    for name, variant in variants.items():
        enc.write_bytes(variant)
        with pytest.raises(IntegrityError):
            _decrypt(enc, out, keypair[0])
        assert not out.exists(), name


def test_wrong_key_fails_without_output(
    tiny_avi: Path,
    keypair: tuple[Path, Path],
    other_keypair: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    enc, dec = tmp_path / "v.vcr", tmp_path / "v.avi"
    for mode in ("secure", "paper"):
        api.encrypt(tiny_avi, enc, keypair[1], mode=mode, force=True)  # the same name twice
        with pytest.raises(WrongKeyError, match="wrong key"):
            api.decrypt(enc, dec, other_keypair[0])
        assert not dec.exists()
    assert _leftovers(tmp_path) == []


def test_non_avi_and_non_vidcrypt_inputs_are_rejected(
    keypair: tuple[Path, Path], tmp_path: Path
) -> None:
    junk = tmp_path / "junk.avi"
    junk.write_bytes(b"RIFF not really an avi" * 10)
    with pytest.raises(UnsupportedFileError):
        api.encrypt(junk, tmp_path / "o.vcr", keypair[1])
    with pytest.raises(UnsupportedFileError, match="bad magic"):
        api.decrypt(junk, tmp_path / "o.avi", keypair[0])
    assert not (tmp_path / "o.vcr").exists() and not (tmp_path / "o.avi").exists()


def test_chunk_size_is_validated() -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        SecureConfig(chunk_size=10)


@pytest.mark.parametrize("mapped", [True, False])
def test_mapped_and_read_inputs_give_the_same_checks(
    mapped: bool, keypair: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both input paths (memory-mapped windows, in-order reads) round-trip and reject edits."""
    monkeypatch.setattr(secure, "_MMAP", mapped)
    monkeypatch.setattr(secure, "_WINDOW", 4096)  # records cross window ends
    src, enc, out = tmp_path / "p.bin", tmp_path / "p.vcr", tmp_path / "out.bin"
    pub = load_public_key(keypair[1])
    for size in (0, 1, 1024, 5000, 9 * 1024, 9 * 1024 + 7):
        plain = bytes((i * 7 + size) % 251 for i in range(size))
        src.write_bytes(plain)
        stats = encrypt_file(src, enc, pub, SecureConfig(1024))
        assert stats["chunks"] == max(1, -(-size // 1024)) and stats["bytes_in"] == size
        assert _decrypt(enc, out, keypair[0])["bytes_out"] == size
        assert out.read_bytes() == plain
    data = enc.read_bytes()
    with open(enc, "rb") as fh:
        body = read_preamble(fh).body_offset
    recs = _records(data, body)
    variants = {
        "bit flip": data[:-3000] + bytes([data[-3000] ^ 1]) + data[-2999:],
        "drop chunk 2": data[:body] + b"".join(recs[:2] + recs[3:]),
        "swap chunks 5 and 6": data[:body] + b"".join(recs[:5] + [recs[6], recs[5]] + recs[7:]),
        "appended data": data + b"\x00",
        "truncated": data[:-1],
        "no final chunk": data[:body] + b"".join(recs[:-1]),
    }
    for name, variant in variants.items():
        enc.write_bytes(variant)
        out.unlink(missing_ok=True)
        with pytest.raises(IntegrityError):
            _decrypt(enc, out, keypair[0])
        assert not out.exists(), name
    assert _leftovers(tmp_path) == []


def test_a_pipe_can_be_encrypted(keypair: tuple[Path, Path], tmp_path: Path) -> None:
    """A non-regular input (a FIFO) is read in order instead of memory-mapped."""
    plain = bytes(range(256)) * 20
    fifo, enc, out = tmp_path / "in.fifo", tmp_path / "p.vcr", tmp_path / "out.bin"
    os.mkfifo(fifo)

    def feed() -> None:
        with open(fifo, "wb") as fh:
            for i in range(0, len(plain), 700):
                fh.write(plain[i : i + 700])

    writer = threading.Thread(target=feed)
    writer.start()
    stats = encrypt_file(fifo, enc, load_public_key(keypair[1]), SecureConfig(1024))
    writer.join()
    assert stats["chunks"] == 5 and stats["bytes_in"] == len(plain)
    _decrypt(enc, out, keypair[0])
    assert out.read_bytes() == plain
