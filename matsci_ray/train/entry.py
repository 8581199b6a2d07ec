"""What Ray Train's controller unpickles from a trainer, in a module that imports neither PyG
nor the models: the data config, and the workers' entry points.

The controller is an actor in a process of its own, started for every run (and every Tune
trial); before it starts any worker it unpickles the run's context (the data config among it)
and the data sets' plans, importing every module they name. Named from the trainer's or the
training loop's module, that import was the loop's (PyG, which imports ``torch._dynamo``, and
every encoder), which the controller never runs and each run waited for. The loops are
imported inside the entry points, so only the workers that run them pay for them
(``tests/test_sharded_validation.py`` checks what the controller's side imports).
"""

from __future__ import annotations

from typing import Any

import ray.train


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """A predictive run's worker (:mod:`matsci_ray.train.loop`)."""
    from matsci_ray.train.loop import train_loop_per_worker as run

    run(loop_config)


def generative_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """A generative run's worker (:mod:`matsci_ray.generative.train`)."""
    from matsci_ray.generative.train import train_loop_per_worker as run

    run(loop_config)


class ShardedValidation(ray.train.DataConfig):
    """Every ``train:`` data set split equally among the workers (DDP needs the same number
    of steps on each, so Ray drops up to ``world - 1`` rows per epoch), every ``val:`` one
    split unequally: each row is scored by exactly one worker, and a worker's shard may be
    empty (``loop.validate`` all-reduces sums and counts). One worker reads every data set
    whole, in its own process: a split of one would cost a coordinator actor per data set,
    each a process to start per run.

    ``preserve_order`` (``data.preserve_order``) overrides the driver's Ray Data context in
    the shards' execution options: the order the training loop's seeds act on."""

    def __init__(self, preserve_order: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.preserve_order = preserve_order

    def _resolve_execution_options(self, dataset_name: str) -> Any:
        options = super()._resolve_execution_options(dataset_name)
        options.preserve_order = self.preserve_order
        return options

    def configure(
        self,
        datasets: dict[str, ray.data.Dataset],
        world_size: int,
        worker_handles: Any,
        worker_node_ids: Any,
        **kwargs: Any,
    ) -> list[dict[str, Any]]:
        if world_size == 1:  # nothing to split: no SplitCoordinator actor per data set
            return [{name: self._prepared(name, ds).iterator() for name, ds in datasets.items()}]
        train = {k: v for k, v in datasets.items() if not k.startswith("val:")}
        shards = super().configure(train, world_size, worker_handles, worker_node_ids, **kwargs)
        hints = worker_node_ids if self._enable_shard_locality else None
        for name, ds in datasets.items():
            if name in train:
                continue
            splits = self._prepared(name, ds).streaming_split(
                world_size, equal=False, locality_hints=hints
            )
            for shard, split in zip(shards, splits, strict=True):
                shard[name] = split
        return shards

    def _prepared(self, name: str, ds: ray.data.Dataset) -> ray.data.Dataset:
        """A copy named ``name`` with Ray's own per-data-set options, as Ray's
        ``DataConfig.configure`` prepares each data set."""
        ds = ds.copy(ds)
        ds.set_name(name)
        ds.context.execution_options = self._resolve_execution_options(name)
        return ds
