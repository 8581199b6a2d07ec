"""One epoch's training batches on one worker: a data set's shard streamed in its seeded
order, several interleaved by the mixing schedule, or regrouped into atom batches; and where
``optim.max_steps_per_epoch`` ends the epoch."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

from matsci_ray.config import ExperimentConfig
from matsci_ray.data.mixing import MixedBatches, epoch_batches, mixture_weights
from matsci_ray.graphs.batching import AtomPacker
from matsci_ray.train.data_order import announce, order_seed


def remaining_steps(config: ExperimentConfig, taken: int) -> int | None:
    """Steps left in an epoch that has taken ``taken``: up to ``optim.max_steps_per_epoch``,
    or ``None`` (to the end of the pass). Every worker counts the same steps, so all stop
    together, and the loop's lockstep asks nothing of the others past the last one."""
    limit = config.optim.max_steps_per_epoch
    return None if limit is None else max(limit - taken, 0)


def train_batches(
    config: ExperimentConfig,
    shards: dict[str, Any],
    sizes: dict[str, int],
    batch_size: int,
    world_size: int,
    epoch: int = 0,
    rank: int = 0,
    order_file: str | None = None,
    packer: AtomPacker | None = None,
) -> Iterator[dict[str, Any]]:
    """One epoch of row batches of ``batch_size`` rows (this worker's share of the global
    batch): a single data set streams directly; several are interleaved by the mixing
    schedule so that no data set starves.

    With a ``packer`` (``data.max_atoms_per_batch``) the rows are read ``batch_size`` at a
    time and regrouped into batches of at most its atoms. A single data set's pass is then
    used once, every row in one batch; several are interleaved for exactly this worker's
    share of the epoch's rows, ``ceil(total / world_size)``, so under proportional mixing
    with one worker every row is used once too (the schedule's first ``total`` slots hold
    each data set exactly its size), and with several up to one row more or less per data
    set, as Ray's equal split of each data set leaves them.

    Each pass over a data set is ordered by ``(run seed, epoch, pass)`` alone: rank 0
    announces it in ``order_file`` for the split's coordinator, and the local shuffle buffer
    is seeded with it (and the rank), so a resumed or restarted run sees what an
    uninterrupted one sees."""
    buffer = config.data.shuffle_buffer or None

    def passes(name: str, shard: Any) -> Callable[[], Iterator[dict[str, Any]]]:
        counter = itertools.count()

        def start() -> Iterator[dict[str, Any]]:
            index = next(counter)
            if rank == 0 and order_file is not None:
                announce(order_file, name, epoch, index)
            return iter(
                shard.iter_batches(
                    batch_size=batch_size,
                    batch_format="numpy",
                    local_shuffle_buffer_size=buffer,
                    local_shuffle_seed=order_seed(config.run.seed, epoch, index, rank)
                    if buffer
                    else None,
                    prefetch_batches=2,
                )
            )

        return start

    if len(shards) == 1:
        rows = passes(*next(iter(shards.items())))()
        return rows if packer is None else packer(rows)
    weights = mixture_weights(sizes, config.data.mix, config.data.mix_temperature)
    sources = {name: passes(name, shard) for name, shard in shards.items()}
    if packer is None:
        batches = epoch_batches(sizes, batch_size, world_size)
        return iter(MixedBatches(sources, weights, batch_size, batches))
    share = -(-sum(sizes.values()) // world_size)
    mixed = MixedBatches(sources, weights, batch_size, -(-share // batch_size))
    return packer(_first_rows(iter(mixed), share))


def _first_rows(batches: Iterator[dict[str, Any]], count: int) -> Iterator[dict[str, Any]]:
    """The first ``count`` rows of ``batches``, the last batch cut short."""
    for rows in batches:
        size = len(next(iter(rows.values()), ()))
        if size >= count:
            yield {column: values[:count] for column, values in rows.items()}
            return
        yield rows
        count -= size
