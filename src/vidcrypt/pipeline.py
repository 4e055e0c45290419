"""Bounded background reader and writer so that file I/O overlaps with encryption.

Buffers come from fixed pools (``depth`` buffers of ``size`` bytes), so memory stays bounded
whatever the file size. File reads and writes release the GIL, so on two or more cores they run
while the main thread seals or opens a chunk.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import BinaryIO

__all__ = ["BufferedWriter", "ReadAhead"]


class BufferedWriter:
    """Write ``(prefix, buffer[:length])`` items to ``fh`` from a background thread.

    Args:
        fh: Open binary file.
        size: Size of each pooled buffer in bytes.
        depth: Number of pooled buffers (the most data in flight).
    """

    def __init__(self, fh: BinaryIO, size: int, depth: int = 3) -> None:
        self.fh = fh
        self._free: queue.Queue[bytearray] = queue.Queue()
        for _ in range(depth):
            self._free.put(bytearray(size))
        self._todo: queue.Queue[tuple[bytes, bytearray, int] | None] = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="vidcrypt-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._todo.get()
            if item is None:
                return
            prefix, buf, length = item
            try:
                if self._error is None:
                    if prefix:
                        self.fh.write(prefix)
                    self.fh.write(memoryview(buf)[:length])
            except BaseException as exc:  # reported to the main thread
                self._error = exc
            finally:
                self._free.put(buf)

    def buffer(self) -> bytearray:
        """Take a free buffer from the pool (blocks while all are in flight)."""
        self._check()
        return self._free.get()

    def submit(self, prefix: bytes, buf: bytearray, length: int) -> None:
        """Queue ``prefix`` followed by ``buf[:length]`` for writing; ``buf`` returns to the pool."""
        self._check()
        self._todo.put((prefix, buf, length))

    def close(self) -> None:
        """Wait for all queued writes, stop the thread and re-raise any write error."""
        self._todo.put(None)
        self._thread.join()
        self._check()

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def __enter__(self) -> BufferedWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self._todo.put(None)
            self._thread.join()


class ReadAhead:
    """Fill pooled buffers with ``fill(buffer) -> (item, length)`` in a background thread.

    Iterating yields ``(item, buffer, length)`` in order until ``fill`` returns ``length == 0``
    (which is yielded too, so the consumer sees the end); after using a buffer, give it back
    with :meth:`release`. An exception raised by ``fill`` is re-raised by the iterator at the
    point it happened.

    Args:
        fill: Reads the next piece into the buffer; returns any metadata and the bytes read.
        size: Size of each pooled buffer in bytes.
        depth: Number of pooled buffers (the most data read ahead).
    """

    def __init__(
        self, fill: Callable[[bytearray], tuple[object, int]], size: int, depth: int = 3
    ) -> None:
        self._fill = fill
        self._free: queue.Queue[bytearray] = queue.Queue()
        for _ in range(depth):
            self._free.put(bytearray(size))
        self._done: queue.Queue[tuple[object, bytearray, int] | BaseException] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vidcrypt-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            buf = self._free.get()
            if self._stop.is_set():
                return
            try:
                item, length = self._fill(buf)
            except BaseException as exc:  # re-raised in the consumer
                self._done.put(exc)
                return
            self._done.put((item, buf, length))
            if length == 0:
                return

    def __iter__(self) -> Iterator[tuple[object, bytearray, int]]:
        while True:
            got = self._done.get()
            if isinstance(got, BaseException):
                raise got
            yield got
            if got[2] == 0:
                return

    def release(self, buf: bytearray) -> None:
        """Return a buffer to the pool."""
        self._free.put(buf)

    def close(self) -> None:
        """Stop reading ahead (the thread ends at its next buffer)."""
        self._stop.set()
        self._free.put(bytearray(0))
        self._thread.join()

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
