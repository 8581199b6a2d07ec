"""Mixing several data sets: weights, the interleaving schedule, and the batch assembly."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from matsci_ray.data.mixing import MixedBatches, epoch_batches, mixture_weights, schedule

SIZES = {"oc20": 1000, "mp": 37, "lips": 200}
Batch = dict[str, np.ndarray]


Factory = Callable[[], Iterator[Batch]]


def _source(name: str, n: int, sizes: tuple[int, ...] = (64,)) -> tuple[Factory, list[int]]:
    """A factory over ``n`` rows with ids ``name:k``, in batches cycling through ``sizes``;
    the returned list records one entry per factory call."""
    calls: list[int] = []

    def factory() -> Iterator[Batch]:
        calls.append(1)
        start, k = 0, 0
        while start < n:
            stop = min(n, start + sizes[k % len(sizes)])
            ids = np.array([f"{name}:{r}" for r in range(start, stop)], dtype=object)
            yield {
                "dataset": np.array([name] * (stop - start), dtype=object),
                "row": ids,
                "energy": np.arange(start, stop, dtype=np.float64),
                "cell": np.tile(np.eye(3), (stop - start, 1, 1)),
                "pbc": np.ones((stop - start, 3), dtype=bool),
            }
            start, k = stop, k + 1

    return factory, calls


def _prefix_counts(plan: np.ndarray, n: int) -> np.ndarray:
    return np.cumsum(np.eye(n, dtype=np.int64)[plan], axis=0)


def test_weights_by_hand() -> None:
    sizes = {"b": 300, "a": 100}
    assert mixture_weights(sizes, "proportional") == pytest.approx({"a": 0.25, "b": 0.75})
    assert mixture_weights(sizes, "uniform") == pytest.approx({"a": 0.5, "b": 0.5})
    root = 10 / (10 + math.sqrt(300))  # sqrt(100) / (sqrt(100) + sqrt(300))
    assert mixture_weights(sizes, "temperature", 2.0) == pytest.approx({"a": root, "b": 1 - root})
    assert mixture_weights(sizes, "temperature", 1.0) == pytest.approx({"a": 0.25, "b": 0.75})
    assert mixture_weights(sizes, "temperature", 1e6)["a"] == pytest.approx(0.5, abs=1e-5)
    assert mixture_weights({"x": 10**12, "y": 1}, "temperature", 0.01)["y"] == 0.0  # no overflow


@pytest.mark.parametrize(
    ("sizes", "strategy", "temperature", "match"),
    [
        ({}, "uniform", 2.0, "empty"),
        ({"a": 3, "b": 0}, "proportional", 2.0, "positive"),
        ({"a": 3}, "temperature", 0.0, "temperature"),
        ({"a": 3}, "sqrt", 2.0, "unknown"),
    ],
)
def test_weights_validation(
    sizes: dict[str, int], strategy: str, temperature: float, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        mixture_weights(sizes, strategy, temperature)  # type: ignore[arg-type]


def test_schedule_validation() -> None:
    with pytest.raises(ValueError, match="empty"):
        schedule({}, 4)
    with pytest.raises(ValueError, match="> 0"):
        schedule({"a": 1.0, "b": -0.5}, 4)
    with pytest.raises(ValueError, match="num_samples"):
        schedule({"a": 1.0}, -1)


@pytest.mark.parametrize("strategy", ["proportional", "uniform", "temperature"])
def test_realised_mix_matches_weights_in_every_prefix(strategy: str) -> None:
    weights = mixture_weights(SIZES, strategy)  # type: ignore[arg-type]
    names = sorted(weights)
    w = np.array([weights[name] for name in names])
    total = epoch_batches(SIZES, 8, 1) * 8
    plan = schedule(weights, total)
    counts = _prefix_counts(plan, len(names))
    expected = np.arange(1, total + 1)[:, None] * w
    assert np.abs(counts - expected).max() <= 1 + 1e-9
    # within quota: floor(k·w) <= count <= ceil(k·w)
    assert (counts >= np.floor(expected - 1e-9)).all()
    assert (counts <= np.ceil(expected + 1e-9)).all()
    if strategy == "proportional":  # one exact epoch holds every data set's rows exactly once
        exact = _prefix_counts(schedule(weights, sum(SIZES.values())), len(names))[-1]
        assert dict(zip(names, exact.tolist(), strict=True)) == SIZES
    # the same on every call, and independent of dict order
    assert np.array_equal(plan, schedule(dict(reversed(weights.items())), total))


def test_random_weights_stay_within_quota_and_small_set_is_regular() -> None:
    rng = np.random.default_rng(0)
    for _ in range(40):
        n = int(rng.integers(1, 7))
        raw = rng.random(n) ** 3 + 1e-3
        weights = {f"d{i}": float(x) for i, x in enumerate(raw)}
        w = raw / raw.sum()
        plan = schedule(weights, 1500)
        expected = np.arange(1, 1501)[:, None] * w
        assert np.abs(_prefix_counts(plan, n) - expected).max() < 1
        small = int(np.argmin(w))  # in every window of ceil(1/w) slots, the tail included
        gaps = np.diff(np.concatenate([[-1], np.flatnonzero(plan == small), [1500]]))
        assert gaps.max() <= math.ceil(1 / w[small] - 1e-12)


def test_no_starvation() -> None:
    factories = {name: _source(name, n)[0] for name, n in SIZES.items()}
    mixed = MixedBatches(factories, mixture_weights(SIZES, "uniform"), 8, 40)
    for batch in mixed:
        assert set(batch["dataset"]) == set(SIZES)
    weights = mixture_weights(SIZES, "proportional")
    names = sorted(weights)
    window = math.ceil(1 / weights["mp"])
    hits = np.flatnonzero(schedule(weights, 5000) == names.index("mp"))
    assert hits[0] < window and np.diff(hits).max() <= window


def test_dataset_column_follows_schedule_and_counts() -> None:
    weights = mixture_weights(SIZES, "temperature")
    mixed = MixedBatches({name: _source(name, n)[0] for name, n in SIZES.items()}, weights, 8, 30)
    batches = list(mixed)
    assert len(batches) == len(mixed) == 30
    assert all(len(b["dataset"]) == 8 for b in batches)
    names = np.array(sorted(weights), dtype=object)
    drawn = np.concatenate([b["dataset"] for b in batches])
    assert np.array_equal(drawn, names[schedule(weights, 240)])
    for batch in batches:  # rows stay whole: every column was gathered with the same index
        assert all(
            row.startswith(f"{ds}:") for ds, row in zip(batch["dataset"], batch["row"], strict=True)
        )
    assert mixed.counts == {name: int((drawn == name).sum()) for name in SIZES}


def test_cycling_repeats_small_and_cuts_big() -> None:
    (big, big_calls), (small, small_calls) = _source("big", 100), _source("small", 10)
    mixed = MixedBatches({"big": big, "small": small}, {"big": 0.5, "small": 0.5}, 8, 20)
    rows = np.concatenate([b["row"] for b in mixed])
    assert len(small_calls) == 8 and len(big_calls) == 1  # 80 small rows = 8 passes of 10
    assert mixed.passes == {"big": 1, "small": 8}
    assert list(rows).count("small:0") == 8
    big_rows = [r for r in rows if r.startswith("big:")]
    assert big_rows == [f"big:{k}" for k in range(80)]  # big: first 80 rows, then cut off


def test_proportional_exact_epoch_uses_each_pass_once() -> None:
    sizes = {"big": 120, "small": 40}
    (big, big_calls), (small, small_calls) = _source("big", 120, (7,)), _source("small", 40, (3,))
    mixed = MixedBatches(
        {"big": big, "small": small},
        mixture_weights(sizes, "proportional"),
        8,
        epoch_batches(sizes, 8, 1),
    )
    rows = np.concatenate([b["row"] for b in mixed])
    assert len(big_calls) == len(small_calls) == 1
    assert sorted(rows) == sorted(
        [f"big:{k}" for k in range(120)] + [f"small:{k}" for k in range(40)]
    )


def test_odd_source_batches_lose_and_duplicate_nothing() -> None:
    factory, calls = _source("odd", 45, (3, 5, 1))
    other, _ = _source("other", 1000)
    mixed = MixedBatches({"odd": factory, "other": other}, {"odd": 3.0, "other": 7.0}, 10, 30)
    rows = [r for b in mixed for r in b["row"] if r.startswith("odd:")]
    assert len(rows) == mixed.counts["odd"] == 90 and len(calls) == 2
    assert rows == [f"odd:{k}" for k in range(45)] * 2  # each pass whole, in order


def test_mixed_dtypes_and_shapes_concatenate() -> None:
    def numeric() -> Iterator[Batch]:
        yield {
            "energy": np.array([1.0, 2.0, 3.0]),
            "cell": np.zeros((3, 3, 3)),
            "pbc": np.ones((3, 3), dtype=bool),
            "positions": np.zeros((3, 2, 3)),
        }

    def with_nulls() -> Iterator[Batch]:
        positions = np.empty(3, dtype=object)
        for k in range(3):
            positions[k] = np.full((k + 1, 3), 7.0)
        yield {
            "energy": np.array([None, -1.0, None], dtype=object),
            "cell": np.ones((3, 3, 3)),
            "pbc": np.zeros((3, 3), dtype=bool),
            "positions": positions,
        }

    mixed = MixedBatches({"a": numeric, "b": with_nulls}, {"a": 0.5, "b": 0.5}, 6, 1)
    (batch,) = list(mixed)
    plan = schedule({"a": 0.5, "b": 0.5}, 6)
    from_a = plan == 0
    assert batch["energy"].dtype == object
    assert list(batch["energy"][from_a]) == [1.0, 2.0, 3.0]
    assert list(batch["energy"][~from_a]) == [None, -1.0, None]
    assert batch["cell"].shape == (6, 3, 3) and batch["cell"].dtype == np.float64
    assert (batch["cell"][from_a] == 0).all() and (batch["cell"][~from_a] == 1).all()
    assert batch["pbc"].shape == (6, 3) and batch["pbc"].dtype == bool
    assert batch["positions"].dtype == object and batch["positions"].shape == (6,)
    assert [p.shape for p in batch["positions"][~from_a]] == [(1, 3), (2, 3), (3, 3)]
    assert all(p.shape == (2, 3) for p in batch["positions"][from_a])


def test_empty_source_and_bad_arguments_raise() -> None:
    def empty() -> Iterator[Batch]:
        yield {"row": np.array([], dtype=object)}  # only empty batches: still no rows

    good, _ = _source("good", 10)
    with pytest.raises(RuntimeError, match="'empty' yielded no rows"):
        list(MixedBatches({"empty": empty, "good": good}, {"empty": 0.5, "good": 0.5}, 4, 2))
    with pytest.raises(ValueError, match="sources"):
        MixedBatches({"good": good}, {"other": 1.0}, 4, 2)
    with pytest.raises(ValueError, match="batch_size"):
        MixedBatches({"good": good}, {"good": 1.0}, 0, 2)


def test_epoch_batches() -> None:
    assert epoch_batches(SIZES, 8, 1) == 155  # ceil(1237 / 8)
    assert epoch_batches(SIZES, 8, 4) == 39  # ceil(1237 / 32)
    assert epoch_batches({"a": 64}, 8, 8) == 1
    with pytest.raises(ValueError, match="world_size > 0"):
        epoch_batches(SIZES, 8, 0)
