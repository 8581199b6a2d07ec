"""Each epoch's training-data order, derived from the run seed and the epoch.

Ray Data reseeds a shuffle per *execution* (``reseed_after_execution``): the seed mixes in an
execution index kept in the dataset's context, which the streaming-split coordinator of each
new worker group starts again from where the driver left it, and which Ray bumps only when an
execution shuts down (in Ray 2.60 the first two epochs of a split were seen to share an
order). A run resumed at epoch k, or restarted by ``FailureConfig``, so replays early epochs'
orders instead of epoch k's.

Here the order of a pass is a function of ``(run seed, epoch, pass)`` only. Rank 0 of the
training loop announces the epoch and pass in a small JSON file in the run directory before
it starts a pass (:func:`announce`), and the coordinator reads it when it plans that pass:
for the file order of a streamed split (:class:`EpochFileShuffle`) and the block order of a
cached one (:func:`randomize_blocks_by_epoch`). Ray Train V2 keeps a run's storage on a file
system that every node reads, which is what this relies on. Without an announcement (a
dataset iterated outside the training loop) each execution gets a new order, Ray's way.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray.data
from ray.data import RandomSeedConfig

from matsci_ray.storage import location, read_text, write_text

ORDER_FILE = ".data-order.json"


def order_seed(seed: int, *keys: int) -> int:
    """A 32-bit seed from ``seed`` and ``keys`` (epoch, pass, rank): NumPy's SeedSequence,
    the same in every process and independent of Ray's own seed derivation."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0])


@contextmanager
def block_order(preserve: bool) -> Iterator[None]:
    """Data sets made inside keep their blocks in plan order when ``preserve`` (each data
    set captures a copy of the current Ray Data context when it is made). Without it, a
    ``materialize`` stores its blocks in the order their tasks finish, so the same seeded
    permutation of them is a different data order in every run."""
    options = ray.data.DataContext.get_current().execution_options
    before, options.preserve_order = options.preserve_order, preserve
    try:
        yield
    finally:
        options.preserve_order = before


def announce(path: Path | str, dataset: str, epoch: int, pass_index: int) -> None:
    """Record that ``dataset``'s next pass is pass ``pass_index`` of ``epoch`` (rank 0, before
    it starts iterating; the pass begins only once every rank has asked for it)."""
    where = location(path)
    try:
        passes = json.loads(read_text(where))
    except (FileNotFoundError, json.JSONDecodeError):
        passes = {}
    passes[dataset] = [epoch, pass_index]
    write_text(where, json.dumps(passes))  # atomic: a reader never sees half a file


@dataclass(frozen=True)
class EpochOrder:
    """Where a data set's coordinator learns which ``(epoch, pass)`` it is planning."""

    seed: int
    dataset: str
    path: str | None = None  # the announcement file (:data:`ORDER_FILE` in the run directory)

    def announced(self) -> tuple[int, int] | None:
        """The ``(epoch, pass)`` last announced for this data set, if any."""
        if self.path is None:
            return None
        try:
            entry = json.loads(read_text(location(self.path))).get(self.dataset)
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return None if entry is None else (int(entry[0]), int(entry[1]))

    def pass_seed(self) -> int | None:
        """The announced pass's seed; None when nothing was announced."""
        key = self.announced()
        return None if key is None else order_seed(self.seed, *key)


@dataclass
class EpochFileShuffle(ray.data.FileShuffleConfig):
    """Ray Data's file shuffle, seeded by the announced pass (:class:`EpochOrder`) instead
    of by Ray's execution index."""

    order: EpochOrder | None = field(default=None)

    def get_seed(self, execution_idx: int = 0) -> int | None:
        seed = self.order.pass_seed() if self.order is not None else None
        return super().get_seed(execution_idx) if seed is None else seed


@dataclass
class EpochBlockSeed(RandomSeedConfig):
    """``randomize_block_order``'s seed, taken from the announced pass."""

    order: EpochOrder | None = field(default=None)

    def get_seed_tuple(self, *, data_context: ray.data.DataContext) -> Any:
        seed = self.order.pass_seed() if self.order is not None else None
        if seed is None:
            return super().get_seed_tuple(data_context=data_context)
        fixed = RandomSeedConfig(seed=seed, reseed_after_execution=False)
        return fixed.get_seed_tuple(data_context=data_context)


def randomize_blocks_by_epoch(ds: ray.data.Dataset, order: EpochOrder) -> ray.data.Dataset:
    """``ds`` (materialized) in a new block order every pass, the announced pass's own.

    ``Dataset.randomize_block_order`` copies any seed config it is given into a plain
    ``RandomSeedConfig``, so the epoch-aware one is set on the operator it plans (Ray 2.60's
    ``RandomizeBlocks.seed_config``, read when each execution is planned). Blocks are only
    reordered, never copied."""
    shuffled = ds.randomize_block_order(
        seed=RandomSeedConfig(seed=order.seed, reseed_after_execution=True)
    )
    operator = shuffled._logical_plan.dag
    if not isinstance(getattr(operator, "seed_config", None), RandomSeedConfig):
        raise RuntimeError(f"Ray Data's block shuffle has changed: {type(operator).__name__}")
    seed = EpochBlockSeed(seed=order.seed, reseed_after_execution=True, order=order)
    object.__setattr__(operator, "seed_config", seed)  # a frozen dataclass
    return shuffled
