"""The ordered worker pool: in-order claims, every item processed, first error wins, cleanup."""

from __future__ import annotations

import threading
import time

import pytest

from vidcrypt.pipeline import OrderedWorkers


class _Job:
    """Claims ``n`` items in order; ``process`` records them (optionally failing some)."""

    def __init__(self, n: int, bad_claim: int = -1, bad_process: tuple[int, ...] = ()) -> None:
        self.n, self.bad_claim, self.bad_process = n, bad_claim, bad_process
        self.claimed: list[int] = []
        self.done: dict[int, int] = {}
        self.states: list[list[int]] = []
        self.closed: list[list[int]] = []
        self.lock = threading.Lock()

    def make_state(self) -> list[int]:
        state: list[int] = []
        with self.lock:
            self.states.append(state)
        return state

    def claim(self, state: list[int], index: int) -> int | None:
        if index == self.bad_claim:
            raise ValueError(f"bad record {index}")
        if index >= self.n:
            return None
        self.claimed.append(index)
        return index * 10

    def process(self, state: list[int], index: int, item: int) -> None:
        time.sleep(0.001 * (index % 3))  # finish out of order
        if index in self.bad_process:
            raise KeyError(f"chunk {index}")
        state.append(index)
        with self.lock:
            self.done[index] = item

    def close(self, state: list[int]) -> None:
        with self.lock:
            self.closed.append(state)


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_items_are_claimed_in_order_and_all_processed(workers: int) -> None:
    job = _Job(20)
    pool = OrderedWorkers(job.claim, job.process, job.make_state, workers, job.close)
    pool.run()
    assert job.claimed == list(range(20))
    assert job.done == {i: i * 10 for i in range(20)}
    assert pool.claimed == 20
    assert len(job.states) == workers and len(job.closed) == workers


def test_the_lowest_numbered_error_is_raised_after_earlier_items_finish() -> None:
    job = _Job(30, bad_process=(7, 12))
    pool = OrderedWorkers(job.claim, job.process, job.make_state, 3, job.close)
    with pytest.raises(KeyError, match="chunk 7"):
        pool.run()
    assert set(range(7)) <= set(job.done)
    assert max(job.claimed) < 30  # claiming stopped early
    assert len(job.closed) == 3


def test_a_claim_error_comes_after_the_failures_of_earlier_items() -> None:
    job = _Job(30, bad_claim=5)
    with pytest.raises(ValueError, match="bad record 5"):
        OrderedWorkers(job.claim, job.process, job.make_state, 2).run()
    assert job.claimed == list(range(5)) and set(job.done) == set(range(5))

    job = _Job(30, bad_claim=5, bad_process=(3,))
    with pytest.raises(KeyError, match="chunk 3"):
        OrderedWorkers(job.claim, job.process, job.make_state, 2).run()


def test_workers_must_be_positive() -> None:
    with pytest.raises(ValueError, match="workers"):
        OrderedWorkers(lambda s, i: None, lambda s, i, x: None, lambda: None, 0)
