"""Validation batches kept in the worker between epochs.

A worker scores the same validation shard every epoch. Streaming it again each time costs a
Ray Data pass (the split coordinator's start, block fetches) and a collation per batch,
which on a small shard is a visible share of a short epoch. A shard of at most
``data.val_keep_max_atoms`` atoms is therefore kept after its first pass, collated and on
the worker's device, and later epochs score those batches; a larger shard streams every
epoch, as before, and nothing is held once it is known to be over the limit.

The kept batches are the ones the first pass dealt this worker. With several workers Ray's
split may deal rows differently per epoch; each worker keeping its first pass's rows still
scores every row of the split exactly once over the group, which is what the all-reduced
metrics need. A new worker group (restart, elastic resize) starts with nothing kept."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any


class KeptBatches:
    """Batches of one shard, kept after the first complete pass if they hold at most
    ``max_atoms`` atoms (0: never kept)."""

    def __init__(self, max_atoms: int) -> None:
        self.max_atoms = max_atoms
        self.kept: list[Any] | None = None
        self.too_large = max_atoms <= 0

    def __call__(self, stream: Callable[[], Iterator[Any]]) -> Iterator[Any]:
        """The kept batches, or a new pass of ``stream()`` (kept as it goes while under
        the limit; a pass cut short keeps nothing)."""
        if self.kept is not None:
            yield from self.kept
            return
        kept: list[Any] = []
        atoms = 0
        for batch in stream():
            if not self.too_large:
                atoms += int(batch.num_nodes)
                self.too_large = atoms > self.max_atoms
                if self.too_large:
                    kept.clear()
                else:
                    kept.append(batch)
            yield batch
        if not self.too_large:
            self.kept = kept
