"""The next batches made in a background thread while the current one trains.

Collating a batch (NumPy rows into a PyG graph batch) is host work that the training thread
otherwise does between two steps, with the model idle: on a GPU a step can be shorter than
its collation. :class:`Prefetcher` runs the producing iterator (Ray Data's batches, then
collation) in a thread of its own, at most ``depth`` items ahead. Only data work belongs
there: collective calls (``all_reduce``) must stay in the training thread, in the same order
on every rank.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from types import TracebackType
from typing import Generic, TypeVar

T = TypeVar("T")

_END = object()  # the producer is exhausted
_POLL_S = 0.1  # how often a blocked producer looks whether it should stop


def ahead(items: Iterable[T], depth: int) -> AbstractContextManager[Iterator[T]]:
    """``items`` made ``depth`` ahead in a background thread (:class:`Prefetcher`), or, with
    ``depth`` 0, as they are asked for, in the caller's thread."""
    return Prefetcher(items, depth) if depth > 0 else nullcontext(iter(items))


class Prefetcher(Generic[T]):
    """Iterate ``items`` in a background thread, ``depth`` items ahead; in order, and with
    the producer's exception raised in the consumer (its own type and traceback).

    Use it as a context manager: leaving early (an epoch capped at N steps, an error) stops
    the producer after the item it is making, so no thread outlives its epoch's data."""

    def __init__(self, items: Iterable[T], depth: int = 2) -> None:
        if depth < 1:
            raise ValueError(f"depth must be at least 1, not {depth}")
        self._queue: queue.Queue[tuple[bool, object]] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._finished = False
        self._thread = threading.Thread(
            target=self._produce, args=(iter(items),), name="matsci-ray-prefetch", daemon=True
        )
        self._thread.start()

    def _offer(self, entry: tuple[bool, object]) -> bool:
        """Queue ``entry`` unless told to stop first; whether it was queued."""
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, items: Iterator[T]) -> None:
        try:
            for item in items:
                if not self._offer((True, item)):
                    return
            self._offer((True, _END))
        except BaseException as error:
            self._offer((False, error))

    def __iter__(self) -> Prefetcher[T]:
        return self

    def __next__(self) -> T:
        if self._finished:
            raise StopIteration
        made, item = self._queue.get()
        if not made:
            self._finished = True
            assert isinstance(item, BaseException)
            raise item
        if item is _END:
            self._finished = True
            raise StopIteration
        return item  # type: ignore[return-value]

    def close(self, timeout: float = 10.0) -> None:
        """Stop the producer and wait up to ``timeout`` s for it to finish the item it is
        making (a daemon thread: a producer stuck in a read does not hold the process)."""
        self._stop.set()
        self._finished = True
        self._thread.join(timeout)

    def __enter__(self) -> Prefetcher[T]:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
