"""The training loops' background collation (:class:`matsci_ray.train.prefetch.Prefetcher`):
every item in order, ahead of the consumer, the producer's error raised where it is consumed,
and no thread left behind by an epoch that stops early."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator

import pytest

from matsci_ray.errors import StructureError
from matsci_ray.train.prefetch import Prefetcher, ahead


def test_every_item_in_order() -> None:
    with Prefetcher(range(100), depth=3) as items:
        assert list(items) == list(range(100))
        assert list(items) == []  # exhausted stays exhausted


def test_the_producer_runs_ahead_while_the_consumer_holds_an_item() -> None:
    made = [threading.Event() for _ in range(4)]

    def produce() -> Iterator[int]:
        for k, event in enumerate(made):
            event.set()
            yield k

    with Prefetcher(produce(), depth=2) as items:
        assert next(items) == 0
        # items 1 and 2 are made (queued) while item 0 is still being used
        assert made[2].wait(timeout=10)
        assert list(items) == [1, 2, 3]


def test_the_producers_error_is_raised_after_the_items_before_it() -> None:
    def produce() -> Iterator[int]:
        yield 0
        yield 1
        raise StructureError("shard-0.parquet, record 7: no atoms")

    with Prefetcher(produce()) as items:
        assert [next(items), next(items)] == [0, 1]
        with pytest.raises(StructureError, match="record 7"):
            next(items)
        with pytest.raises(StopIteration):
            next(items)


def test_leaving_early_stops_the_producer() -> None:
    """An epoch capped at N steps leaves the stream mid-way: the thread ends with it, having
    made at most ``depth`` items (and the one it was making) beyond those taken."""
    made = itertools.count()

    def endless() -> Iterator[int]:
        while True:
            yield next(made)

    with Prefetcher(endless(), depth=2) as items:
        taken = list(itertools.islice(items, 5))
        thread = items._thread
    assert taken == [0, 1, 2, 3, 4]
    assert not thread.is_alive()
    assert next(made) <= 5 + 2 + 1


def test_depth_must_be_positive() -> None:
    with pytest.raises(ValueError, match="depth"):
        Prefetcher(range(3), depth=0)


@pytest.mark.parametrize("depth", [0, 2])
def test_data_collate_ahead_zero_keeps_the_work_in_the_callers_thread(depth: int) -> None:
    threads: list[threading.Thread] = []

    def produce() -> Iterator[int]:
        for k in range(3):
            threads.append(threading.current_thread())
            yield k

    with ahead(produce(), depth) as items:
        assert list(items) == [0, 1, 2]
    assert all((t is threading.current_thread()) == (depth == 0) for t in threads), threads
