"""Run a stream of chunks through a few worker threads, in order where order matters.

Each worker owns its buffers (so memory is ``workers x`` a few chunks, whatever the file size)
and loops: *claim* the next item (serialised under one lock, so items are read from the
input strictly in order and numbered 0, 1, 2, ...), then *process* it (concurrently with the
other workers). File reads and writes release the GIL and so does pyca/cryptography's
AES-GCM ``encrypt_into``/``decrypt_into``, so on two or more cores one worker seals or
opens a chunk while another reads or writes.

Errors keep the sequential semantics: once item ``i`` failed (in claim or in process) no
further item is claimed, the items before it are still finished, and the error of the
lowest-numbered failed item is raised, exactly the one a one-by-one loop would have raised.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["OrderedWorkers", "default_workers"]

S = TypeVar("S")  # per-worker state (its buffers)
T = TypeVar("T")  # a claimed item


def default_workers() -> int:
    """Workers to use: one per core, at most 2.

    The kernel serialises writes into one file (and their page-cache allocation), which are
    about half of the work, so a third worker would mostly wait.
    """
    return max(1, min(2, os.cpu_count() or 1))


class OrderedWorkers(Generic[S, T]):
    """Claim items in order under a lock and process them on ``workers`` threads.

    Args:
        claim: ``claim(state, index) -> item`` reads item ``index`` into the worker's
            ``state``; returns ``None`` when there is nothing more. Called under the lock, so
            calls happen one at a time with ``index`` = 0, 1, 2, ...
        process: ``process(state, index, item)`` does the work (runs concurrently).
        make_state: Creates one worker's state (called once per worker, in its thread).
        workers: Number of workers; worker 0 is the calling thread.
        close_state: Called with a worker's state when that worker stops (e.g. to unmap).
    """

    def __init__(
        self,
        claim: Callable[[S, int], T | None],
        process: Callable[[S, int, T], None],
        make_state: Callable[[], S],
        workers: int = 1,
        close_state: Callable[[S], None] | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self._claim, self._process, self._make_state = claim, process, make_state
        self._close_state = close_state
        self.workers = workers
        self._lock = threading.Lock()
        self._next = 0  # index of the next item to claim
        self._stop = False  # no more claims (the end was reached or something failed)
        self._errors: list[tuple[int, BaseException]] = []

    @property
    def claimed(self) -> int:
        """Number of items claimed so far (after :meth:`run`: all of them)."""
        return self._next

    def run(self) -> None:
        """Process every item; re-raise the error of the lowest-numbered failed item."""
        threads: list[threading.Thread] = []
        try:
            for k in range(1, self.workers):
                t = threading.Thread(target=self._work, name=f"vidcrypt-worker-{k}", daemon=True)
                t.start()
                threads.append(t)
            self._work()
        finally:
            with self._lock:
                self._stop = True
            for t in threads:
                t.join()
        if self._errors:
            raise min(self._errors, key=lambda e: e[0])[1]

    def _fail(self, index: int, exc: BaseException) -> None:
        with self._lock:
            self._stop = True
            self._errors.append((index, exc))

    def _work(self) -> None:
        try:
            state = self._make_state()
        except BaseException as exc:  # e.g. MemoryError: report it like any failure
            self._fail(-1, exc)
            return
        try:
            self._loop(state)
        finally:
            if self._close_state is not None:
                try:
                    self._close_state(state)
                except BaseException as exc:
                    self._fail(-1, exc)

    def _loop(self, state: S) -> None:
        while True:
            with self._lock:
                if self._stop:
                    return
                index = self._next
                try:
                    item = self._claim(state, index)
                except BaseException as exc:
                    self._stop = True
                    self._errors.append((index, exc))
                    return
                if item is None:
                    self._stop = True
                    return
                self._next += 1
            try:
                self._process(state, index, item)
            except BaseException as exc:
                self._fail(index, exc)
                return
