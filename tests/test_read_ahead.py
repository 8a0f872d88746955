"""read_ahead: validation's and eval's image reading in a thread ahead of the restore."""

from __future__ import annotations

import threading
import time

import pytest

from uniremoval.data.read_ahead import read_ahead
from uniremoval.errors import DataError


def _wait_for(cond, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)
    return cond()


def test_items_come_in_order_and_are_made_ahead_of_the_consumer():
    made: list[int] = []

    def source():
        for i in range(6):
            made.append(i)
            yield i

    it = read_ahead(source(), depth=2)
    assert next(it) == 0
    # While the consumer holds item 0 (restoring it), the thread has made the next ones: 2 queued and
    # a third in hand, waiting for room.
    assert _wait_for(lambda: len(made) == 4)
    time.sleep(0.1)
    assert len(made) == 4  # no further than depth ahead
    assert list(it) == [1, 2, 3, 4, 5]


def test_an_error_comes_after_the_items_before_it():
    def source():
        yield "a"
        yield "b"
        raise DataError("shard x.tar, key k3: truncated")

    it = read_ahead(source())
    assert [next(it), next(it)] == ["a", "b"]
    with pytest.raises(DataError, match="key k3"):
        next(it)


def test_a_loop_left_early_stops_the_thread_without_reading_on():
    made: list[int] = []

    def source():
        for i in range(1000):
            made.append(i)
            yield i

    it = read_ahead(source(), depth=3)
    assert next(it) == 0
    assert _wait_for(lambda: len(made) == 5)
    it.close()
    n = len(made)
    time.sleep(0.1)
    assert len(made) == n <= 5
    assert not [t for t in threading.enumerate() if t.name == "read-ahead"]


def test_depth_must_be_positive():
    with pytest.raises(ValueError, match="depth must be at least 1, got 0"):
        next(read_ahead([1], depth=0))
