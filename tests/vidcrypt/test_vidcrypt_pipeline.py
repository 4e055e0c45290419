"""The read-ahead and write-behind threads: order, bounded pools, error propagation."""

from __future__ import annotations

import io

import pytest

from vidcrypt.pipeline import BufferedWriter, ReadAhead


def test_read_ahead_yields_pieces_in_order_and_the_end():
    src = io.BytesIO(bytes(range(256)) * 10)

    def fill(buf: bytearray) -> tuple[object, int]:
        return None, src.readinto(buf)

    got = b""
    with ReadAhead(fill, size=100, depth=2) as reader:
        lengths = []
        for _, buf, n in reader:
            got += bytes(buf[:n])
            lengths.append(n)
            reader.release(buf)
    assert got == bytes(range(256)) * 10
    assert lengths == [100] * 25 + [60, 0]


def test_read_ahead_reraises_the_fill_error_in_the_consumer():
    calls = []

    def fill(buf: bytearray) -> tuple[object, int]:
        calls.append(1)
        if len(calls) == 3:
            raise ValueError("broken record 2")
        return len(calls), 4

    seen = []
    with pytest.raises(ValueError, match="broken record 2"), ReadAhead(fill, 4, depth=4) as reader:
        for item, buf, _ in reader:
            seen.append(item)
            reader.release(buf)
    assert seen == [1, 2]


def test_buffered_writer_writes_prefix_and_payload_in_order():
    out = io.BytesIO()
    with BufferedWriter(out, size=8, depth=2) as writer:
        for i in range(5):
            buf = writer.buffer()
            buf[:3] = bytes([i, i, i])
            writer.submit(b"<", buf, 3)
    assert out.getvalue() == b"".join(b"<" + bytes([i] * 3) for i in range(5))
