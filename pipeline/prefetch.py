"""Run an iterator ahead in a background thread so producing overlaps consuming."""

from __future__ import annotations

import contextlib
import queue
import threading
import traceback
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
_DONE = object()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def clear_frames(error: BaseException) -> None:
    """Drop the locals of the finished frames in ``error``'s tracebacks (its chained errors'
    too): a producer's frames hold what it was making (a stream's whole row pool), which a
    kept traceback (a notebook's ``sys.last_traceback``) would keep allocated; the traceback
    still names each file and line."""
    pending, seen = [error], set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        traceback.clear_frames(current.__traceback__)
        pending += [current.__cause__, current.__context__]


def prefetch(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Yield ``items``, computed up to ``depth`` ahead in a daemon thread.

    An exception raised while producing is re-raised in the consumer. Closing the returned
    generator early stops the producer at its next item.
    """
    buffer: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                buffer.put(item)
            buffer.put(_DONE)
        except BaseException as error:  # re-raised in the consumer
            clear_frames(error)
            buffer.put(_Failure(error))

    thread = threading.Thread(target=produce, name="pvu-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = buffer.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            with contextlib.suppress(queue.Empty):
                buffer.get(timeout=0.05)
