"""Validation batches kept between epochs (``matsci_ray.train.kept_batches``): a pass is
kept only when it is whole and within the atom limit; otherwise every epoch streams."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch
from torch_geometric.data import Data

from matsci_ray.train.kept_batches import KeptBatches


class Stream:
    """Batches of the given atom counts, counting how often a pass is started."""

    def __init__(self, *atoms: int) -> None:
        self.atoms = atoms
        self.passes = 0

    def __call__(self) -> Iterator[Data]:
        self.passes += 1
        for n in self.atoms:
            yield Data(pos=torch.zeros(n, 3))


def test_a_small_shard_is_streamed_once_and_kept() -> None:
    stream, keep = Stream(3, 4), KeptBatches(max_atoms=7)
    first = list(keep(stream))
    again = list(keep(stream))
    assert stream.passes == 1
    assert [b.num_nodes for b in first] == [3, 4]
    assert all(a is b for a, b in zip(first, again, strict=True))  # the same batches


def test_a_shard_over_the_limit_streams_every_epoch_and_keeps_nothing() -> None:
    stream, keep = Stream(3, 4, 1), KeptBatches(max_atoms=6)
    for _ in range(3):
        assert [b.num_nodes for b in keep(stream)] == [3, 4, 1]
    assert stream.passes == 3
    assert keep.kept is None and keep.too_large


def test_a_pass_cut_short_keeps_nothing() -> None:
    stream, keep = Stream(2, 2, 2), KeptBatches(max_atoms=100)
    assert len(list(itertools.islice(keep(stream), 2))) == 2
    assert keep.kept is None
    assert [b.num_nodes for b in keep(stream)] == [2, 2, 2]  # a whole pass again, then kept
    list(keep(stream))
    assert stream.passes == 2


def test_zero_never_keeps() -> None:
    stream, keep = Stream(1), KeptBatches(max_atoms=0)
    list(keep(stream))
    list(keep(stream))
    assert stream.passes == 2


def test_an_empty_shard_is_kept_empty() -> None:
    stream, keep = Stream(), KeptBatches(max_atoms=10)
    assert list(keep(stream)) == [] and list(keep(stream)) == []
    assert stream.passes == 1
