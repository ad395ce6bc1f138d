"""The read-ahead thread (data/prefetch.py): the same batches in the same order as the loader, a
state that names the next batch the consumer takes (not the ones read ahead), errors raised where
the batch would have been, and a clean stop."""

import threading
import time

import pytest

from megatron_conan.data.prefetch import Prefetcher


class Counter:
    """A stateful loader of the numbers from `start`; `fail_at` raises there, `stop_at` ends there."""

    def __init__(self, fail_at=None, stop_at=None):
        self.position, self.fail_at, self.stop_at = 0, fail_at, stop_at
        self.calls = 0

    def __iter__(self):
        return self

    def __next__(self):
        self.calls += 1
        if self.position == self.stop_at:
            raise StopIteration
        if self.position == self.fail_at:
            raise ValueError(f"bad record at {self.position}")
        self.position += 1
        return self.position - 1

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def _prefetch_threads():
    return [thread for thread in threading.enumerate() if thread.name == "batch-prefetch"]


def _wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.parametrize("depth", [1, 2])
def test_same_batches_in_order_and_the_state_names_the_consumers_next_batch(depth):
    loader = Counter()
    prefetcher = Prefetcher(loader, depth)
    assert [next(prefetcher) for _ in range(5)] == [0, 1, 2, 3, 4]
    _wait_until(lambda: loader.position == 5 + depth + 1)  # read ahead: a full queue and one waiting
    assert prefetcher.state_dict() == {"position": 5}
    resumed = Prefetcher(Counter())
    resumed.load_state_dict(prefetcher.state_dict())
    assert [next(resumed) for _ in range(3)] == [5, 6, 7]
    prefetcher.close()
    resumed.close()
    assert loader.position == 5 and not _prefetch_threads()  # set back; no thread left
    assert next(prefetcher) == 5  # and it goes on from there
    prefetcher.load_state_dict({"position": 2})
    assert next(prefetcher) == 2 and prefetcher.state_dict() == {"position": 3}
    prefetcher.close()


def test_an_error_is_raised_where_its_batch_would_have_been():
    loader = Counter(fail_at=3)
    prefetcher = Prefetcher(loader, 2)
    assert [next(prefetcher) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="bad record at 3"):
        next(prefetcher)
    assert not _prefetch_threads() and prefetcher.state_dict() == {"position": 3}
    loader.fail_at = None  # the cause fixed, the same batch comes next
    assert next(prefetcher) == 3
    prefetcher.close()


def test_a_finite_loader_ends_and_the_thread_with_it():
    prefetcher = Prefetcher(Counter(stop_at=4))
    assert list(prefetcher) == [0, 1, 2, 3]
    assert not _prefetch_threads()
    prefetcher.close()


def test_close_stops_a_thread_blocked_on_a_full_queue():
    loader = Counter()
    prefetcher = Prefetcher(loader, 1)
    assert next(prefetcher) == 0
    _wait_until(lambda: loader.calls >= 3)  # one queued, one built and waiting to go in
    prefetcher.close()
    assert not _prefetch_threads() and loader.position == 1
