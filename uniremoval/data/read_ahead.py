"""Decode the next images while the current ones are restored (or run through a teacher).

Validation, `uniremoval eval`, `restore` and the cache stage read one full-size image at a time in
the main process (no loader workers: the sets are small, ordered, and split by rank), then run the
model on it on the device, where the host waits. `read_ahead` runs the reading in a thread a few items ahead, so the decoding
(PNG/JPEG decoders release the GIL) overlaps that wait instead of adding to it. The consumer sees
the same items in the same order, and an error where the serial loop would have raised it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

_END = object()


def read_ahead(items: Iterable[T], depth: int = 2, name: str = "read-ahead") -> Iterator[T]:
    """`items`, made in a background thread (`name`) at most `depth` ahead of the consumer.

    An exception raised while making an item is raised here after the items before it. Closing
    this generator (a loop left early, Ctrl-C in the consumer) stops the thread after the item it is
    making (waiting up to 5 s for it): it takes no further item.
    """
    if depth < 1:
        raise ValueError(f"depth must be at least 1, got {depth}")
    ready: queue.Queue[tuple[object, BaseException | None]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: tuple[object, BaseException | None]) -> bool:
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            put((_END, exc))
            return
        put((_END, None))

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            item, exc = ready.get()
            if item is _END:
                if exc is not None:
                    raise exc
                return
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        thread.join(timeout=5)  # bounded: an item stuck in a read (a stalled URL) must not hold up Ctrl-C
