"""Interleave several data sets into mixed training batches (pure Python and numpy).

A shuffled concatenation gives each data set its rate only on average: a small one can be absent
for many steps. Here a deterministic schedule (:func:`schedule`) gives, for every prefix of k
slots, ``count_i(k) ∈ {floor(k·w_i), ceil(k·w_i)}``, and the smallest data set exactly
``floor(k·w_i)``, so it appears in every window of ``ceil(1/w_i)`` slots.

How: earliest-deadline-first over per-occurrence windows. Occurrence j of data set i must fall in
slots ``[floor((j-1)/w_i) + 1, ceil(j/w_i)]`` (those that keep it within quota); the smallest one
is pinned to slot ``ceil(j/w_i)``. Any L consecutive slots contain at most Σ floor(L·w_i) ≤ L
windows, plus one for the pinned set only when its L·w is fractional, which makes the floors
lose ≥ 1; so by Hall's theorem a schedule exists, and EDF (optimal for unit jobs with integer
windows) finds it. Weights become exact integers so float rounding cannot move a window.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterator
from fractions import Fraction
from itertools import islice
from typing import Literal

import numpy as np

Batch = dict[str, np.ndarray]
Factory = Callable[[], Iterator[Batch]]
Run = tuple[Batch, int, int]  # rows start:stop of one source batch


def mixture_weights(
    sizes: dict[str, int],
    strategy: Literal["proportional", "uniform", "temperature"],
    temperature: float = 2.0,
) -> dict[str, float]:
    """Sampling weight per data set, summing to 1: ``n_i``, 1, or ``n_i^(1/T)``, normalised.

    T = 1 is proportional and T → ∞ uniform; T = 2 (square root) is the usual multi-task
    compromise that up-weights small data sets without repeating them as often as uniform does.
    """
    if not sizes:
        raise ValueError("mixture_weights: sizes is empty; give at least one data set")
    bad = {name: n for name, n in sizes.items() if not n > 0}
    if bad:
        raise ValueError(f"mixture_weights: data set sizes must be positive, got {bad}")
    names = sorted(sizes)
    if strategy == "proportional":
        raw = np.array([sizes[name] for name in names], dtype=np.float64)
    elif strategy == "uniform":
        raw = np.ones(len(names))
    elif strategy == "temperature":
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"mixture_weights: temperature must be > 0, got {temperature}")
        # log space: n^(1/T) of a 10^8-row data set at small T would overflow a float
        logs = np.log(np.array([sizes[name] for name in names], dtype=np.float64)) / temperature
        raw = np.exp(logs - logs.max())
    else:
        raise ValueError(f"mixture_weights: unknown strategy {strategy!r} (see the signature)")
    return {name: float(v) for name, v in zip(names, raw / raw.sum(), strict=True)}


def _integer_weights(weights: dict[str, float]) -> list[int]:
    """Exact integer weights in sorted-name order, proportional to the given floats."""
    if not weights:
        raise ValueError("schedule: weights is empty; give at least one data set")
    bad = {name: w for name, w in weights.items() if not (math.isfinite(w) and w > 0)}
    if bad:
        raise ValueError(f"schedule: weights must be finite and > 0, got {bad}")
    fractions = [Fraction(weights[name]) for name in sorted(weights)]
    denominator = math.lcm(*(f.denominator for f in fractions))
    ints = [f.numerator * (denominator // f.denominator) for f in fractions]
    common = math.gcd(*ints)
    return [a // common for a in ints]


def _slots(weights: dict[str, float]) -> Iterator[int]:
    """Endless schedule: the index (into sorted names) of the data set filling each slot."""
    ints = _integer_weights(weights)
    total = sum(ints)
    pinned = min(range(len(ints)), key=lambda i: (ints[i], i))  # smallest weight, first name

    def window(i: int, j: int) -> tuple[int, int, int]:
        """(release, deadline, i) of occurrence j (1-based) of data set i, in 1-based slots."""
        deadline = -(-j * total // ints[i])  # ceil(j / w_i)
        release = deadline if i == pinned else (j - 1) * total // ints[i] + 1
        return release, deadline, i

    done = [0] * len(ints)
    pending = [window(i, 1) for i in range(len(ints))]
    heapq.heapify(pending)
    ready: list[tuple[int, int]] = []
    slot = 0
    while True:
        slot += 1
        while pending and pending[0][0] <= slot:
            _, deadline, i = heapq.heappop(pending)
            heapq.heappush(ready, (deadline, i))
        # Non-empty and on time by the argument in the module docstring.
        deadline, i = heapq.heappop(ready)
        if deadline < slot:  # pragma: no cover - would mean the proof or the integers are wrong
            raise AssertionError(f"mixing schedule missed a deadline at slot {slot}")
        yield i
        done[i] += 1
        heapq.heappush(pending, window(i, done[i] + 1))


def schedule(weights: dict[str, float], num_samples: int) -> np.ndarray:
    """Data set index (into ``sorted(weights)``) of each of the first ``num_samples`` slots.

    Deterministic, so every worker computes the same sequence; house-monotone, so the first k
    slots of a longer schedule are the schedule of length k.
    """
    if num_samples < 0:
        raise ValueError(f"schedule: num_samples must be >= 0, got {num_samples}")
    return np.fromiter(islice(_slots(weights), num_samples), dtype=np.intp, count=num_samples)


def epoch_batches(sizes: dict[str, int], batch_size: int, world_size: int) -> int:
    """Batches per worker per epoch, ``ceil(total rows / (batch_size · world_size))``.

    Every worker takes this many steps whatever its shards hold (DDP hangs on unequal step
    counts); the cycling in :class:`MixedBatches` supplies the rows.
    """
    if batch_size <= 0 or world_size <= 0:
        raise ValueError(
            f"epoch_batches: need batch_size, world_size > 0, got {batch_size, world_size}"
        )
    if any(n < 0 for n in sizes.values()):
        raise ValueError(f"epoch_batches: sizes must be >= 0, got {sizes}")
    return -(-sum(sizes.values()) // (batch_size * world_size))


class _Source:
    """One data set's current pass and the unread rest of its current batch."""

    def __init__(self, name: str, factory: Factory) -> None:
        self.name, self.factory = name, factory
        self.iterator: Iterator[Batch] | None = None
        self.batch: Batch = {}
        self.rows = self.offset = self.rows_in_pass = self.passes = 0

    def take(self, count: int) -> list[Run]:
        """``count`` rows as contiguous (batch, start, stop) runs, starting new passes as needed."""
        runs = []
        while count > 0:
            if self.offset >= self.rows:
                self._next_batch()
            run = min(count, self.rows - self.offset)
            runs.append((self.batch, self.offset, self.offset + run))
            self.offset += run
            count -= run
        return runs

    def _next_batch(self) -> None:
        while True:
            if self.iterator is None:
                self.iterator = iter(self.factory())
                self.passes += 1
                self.rows_in_pass = 0
            batch = next(self.iterator, None)
            if batch is None:
                if self.rows_in_pass == 0:
                    msg = "yielded no rows on a fresh pass (empty shard on this worker?)"
                    raise RuntimeError(f"data set {self.name!r} {msg}")
                self.iterator = None
                continue
            rows = len(next(iter(batch.values()), ()))
            if rows:  # Ray can hand over empty batches after filters; skip them
                self.batch, self.rows, self.offset = batch, rows, 0
                self.rows_in_pass += rows
                return

    def close(self) -> None:
        """Close an abandoned pass: Ray's split iterators release their epoch on close."""
        close = getattr(self.iterator, "close", None)
        if close is not None:
            close()
        self.iterator, self.batch, self.rows, self.offset = None, {}, 0, 0


def _object_rows(part: np.ndarray) -> np.ndarray:
    """A column slice as a 1-D object array with one entry (scalar, array or None) per row."""
    if part.dtype == object and part.ndim == 1:
        return part
    if part.ndim == 1:
        return part.astype(object)
    # A stacked (rows, ...) block: fromiter keeps each row as one array element.
    return np.fromiter(iter(part), dtype=object, count=len(part))


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    if len(parts) == 1:
        return parts[0]
    if all(p.dtype != object for p in parts) and len({p.shape[1:] for p in parts}) == 1:
        return np.concatenate(parts)  # numeric (or str) with one row shape: stays numeric
    # Nulls (object) in one source, plain numbers in another, or ragged stacked rows.
    return np.concatenate([_object_rows(p) for p in parts])


class MixedBatches:
    """``num_batches`` batches of ``batch_size`` rows, the sources interleaved by :func:`schedule`.

    Rows come from each source's current pass in order; a source whose pass runs out starts a
    new one by calling its factory again. So under uniform (or temperature) weights a small data
    set is repeated within an epoch, while a large one is cut off at the epoch boundary (the
    next epoch starts a fresh pass: with shuffling, other rows of it are seen). Under
    proportional weights each pass is used about once, but ``epoch_batches`` rounds up, so a
    data set can start a new pass for its last few rows. Each ``iter()`` is one epoch: it starts
    fresh passes and resets :attr:`counts` and :attr:`passes`.
    """

    def __init__(
        self,
        sources: dict[str, Factory],
        weights: dict[str, float],
        batch_size: int,
        num_batches: int,
    ) -> None:
        if set(sources) != set(weights):
            raise ValueError(
                f"MixedBatches: sources {sorted(sources)} != weights {sorted(weights)}"
            )
        if batch_size <= 0 or num_batches < 0:
            raise ValueError(f"MixedBatches: bad batch_size, num_batches {batch_size, num_batches}")
        _integer_weights(weights)  # validate now, not at the first batch
        self.names = sorted(sources)
        self.sources, self.weights = sources, weights
        self.batch_size, self.num_batches = batch_size, num_batches
        self.counts: dict[str, int] = dict.fromkeys(self.names, 0)
        self.passes: dict[str, int] = dict.fromkeys(self.names, 0)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[Batch]:
        sources = [_Source(name, self.sources[name]) for name in self.names]
        self.counts = dict.fromkeys(self.names, 0)
        self.passes = dict.fromkeys(self.names, 0)
        slots = _slots(self.weights)
        size, n = self.batch_size, len(self.names)
        try:
            for _ in range(self.num_batches):
                plan = np.fromiter(islice(slots, size), dtype=np.intp, count=size)
                per_source = np.bincount(plan, minlength=n)
                runs = [run for i, k in enumerate(per_source) for run in sources[i].take(k)]
                # Runs are grouped by source in slot order; a stable sort of the plan lists
                # the slots in that same order, so its inverse scatters them into place.
                order = np.argsort(plan, kind="stable")
                inverse = np.empty(size, dtype=np.intp)
                inverse[order] = np.arange(size)
                in_place = bool(np.all(plan[:-1] <= plan[1:]))  # already grouped: no gather
                for i, source in enumerate(sources):
                    self.counts[source.name] += int(per_source[i])
                    self.passes[source.name] = source.passes
                yield self._assemble(runs, inverse, in_place)
        finally:
            for source in sources:
                source.close()

    @staticmethod
    def _assemble(runs: list[Run], inverse: np.ndarray, in_place: bool) -> Batch:
        columns = {tuple(sorted(batch)) for batch, _, _ in runs}
        if len(columns) > 1:
            raise ValueError(f"mixed data sets disagree on their columns: {sorted(columns)}")
        out: Batch = {}
        for column in runs[0][0]:
            merged = _concat([batch[column][start:stop] for batch, start, stop in runs])
            out[column] = merged if in_place else merged[inverse]
        return out
