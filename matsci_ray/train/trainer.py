"""Build the Ray Train ``TorchTrainer`` for an experiment: graph datasets, scaling, failures.

Graphs are built inside the Ray Data stream (``map_batches``), so neighbour search runs on the
cluster's CPUs in parallel with training, and each worker only collates its own shard.
"""

from __future__ import annotations

import os
from typing import Any

import ray.data
import ray.train
from ray.train.torch import TorchTrainer

from matsci_ray import keys as K
from matsci_ray.config import ExperimentConfig, dump_config
from matsci_ray.data.dataset import open_dataset, sample_rows
from matsci_ray.data.manifest import read_manifest
from matsci_ray.data.mixing import epoch_batches
from matsci_ray.errors import ConfigError
from matsci_ray.graphs.batching import RadiusGraphTransform
from matsci_ray.graphs.collate import batch_targets
from matsci_ray.models import encoder_signature
from matsci_ray.models.registry import is_generative
from matsci_ray.storage import Location, location, ray_storage, resolve
from matsci_ray.tasks.registry import TASKS, primary_metric
from matsci_ray.train.checkpoint import check_resume
from matsci_ray.train.data_order import (
    ORDER_FILE,
    EpochFileShuffle,
    EpochOrder,
    block_order,
    randomize_blocks_by_epoch,
)
from matsci_ray.train.entry import ShardedValidation, train_loop_per_worker
from matsci_ray.train.preflight import PLACEMENT, prepare_run, worker_bundle

GEOMETRY = [K.DATASET, K.SAMPLE_ID, K.ATOMIC_NUMBERS, K.POSITIONS, K.CELL, K.PBC, K.NATOMS]
# Atoms per graph-building batch: each batch pays a fixed cost (Arrow conversion, task
# dispatch), which 64 five-atom MP cells did not amortise.
GRAPH_BATCH_ATOMS = 4096
# Rows per block of a cached split: the unit its per-epoch block-order shuffle moves.
CACHE_BLOCK_ROWS = 64


def needed_columns(config: ExperimentConfig) -> list[str]:
    columns = list(GEOMETRY) + batch_targets(TASKS[name] for name in config.tasks)
    return list(dict.fromkeys(columns))


def graph_batch_rows(summary: dict[str, Any]) -> int:
    """Rows per graph-building batch: about :data:`GRAPH_BATCH_ATOMS` atoms (49 OC20 slabs,
    ~800 MP cells), from a manifest split summary's mean atoms per record."""
    mean = float(summary.get("atoms_per_record", {}).get("mean", 0.0))
    if mean <= 0:
        return 64
    return int(min(max(GRAPH_BATCH_ATOMS / mean, 16), 1024))


def order_file(config: ExperimentConfig) -> str:
    """Where the training loop announces each pass's epoch (in the run directory)."""
    return str(resolve(config.run.storage / config.name) / ORDER_FILE)


def epoch_order(config: ExperimentConfig, dataset: str) -> EpochOrder:
    """How ``dataset``'s training passes are ordered: by run seed, epoch and pass, as the
    training loop announces them (:mod:`matsci_ray.train.data_order`)."""
    return EpochOrder(config.run.seed, dataset, order_file(config))


def graph_dataset(
    config: ExperimentConfig,
    dataset: str,
    split: str,
    limit: int | None = None,
    shuffle_files: bool | None = None,
) -> ray.data.Dataset:
    """Rows of ``dataset``/``split`` (a seeded uniform sample of ``limit``) with radius-graph
    columns added in the stream. ``shuffle_files`` (default: for the train split) reads the
    files in each epoch's own order; a split that is cached is read once in manifest order,
    and its epochs are ordered by :func:`cached_epochs`. The stream and every data set made
    from it keep their blocks in plan order when ``data.preserve_order`` says so."""
    cpus = config.data.task_cpus
    root = config.data.root
    if shuffle_files is None:
        shuffle_files = split == "train"
    shuffle = None
    if shuffle_files:
        shuffle = EpochFileShuffle(config.run.seed, order=epoch_order(config, dataset))
    transform = RadiusGraphTransform(config.data.cutoff, config.data.max_neighbors)
    # pyarrow in and out: the numpy format would pickle nested list columns on the way back
    rows = graph_batch_rows(read_manifest(root, dataset)["splits"].get(split, {}))
    with block_order(config.data.preserve_order):
        ds = open_dataset(root, dataset, split, needed_columns(config), cpus, shuffle_seed=shuffle)
        if limit is not None:  # before the graphs: none is built for a row that is dropped
            ds = sample_rows(ds, root, dataset, split, limit, config.run.seed, num_cpus=cpus)
        return ds.map_batches(transform, batch_format="pyarrow", batch_size=rows, num_cpus=cpus)


def should_cache(config: ExperimentConfig, summary: dict[str, Any]) -> bool:
    """Whether a split's graphs are built once (``data.cache_graphs``): on small data the
    per-epoch read and neighbour search compete with training for the same cores."""
    if config.data.cache_graphs != "auto":
        return config.data.cache_graphs == "always"
    atoms = summary.get("atoms_per_record", {})
    total = float(atoms.get("mean", 0.0)) * float(atoms.get("count", summary.get("records", 0)))
    return 0 < total <= config.data.cache_max_atoms


def cached_epochs(
    ds: ray.data.Dataset, seed: int, order: EpochOrder | None = None
) -> ray.data.Dataset:
    """``ds`` built once and kept in the object store in blocks of
    :data:`CACHE_BLOCK_ROWS` rows, visited in a new seeded order every epoch (``order``'s:
    the epoch's own; without it, each execution's); the workers' shuffle buffers mix rows
    within that order. The re-blocking keeps that shuffle fine-grained when graphs were built
    in batches of hundreds of small cells."""
    blocks = ds.repartition(target_num_rows_per_block=CACHE_BLOCK_ROWS).materialize()
    return randomize_blocks_by_epoch(blocks, order or EpochOrder(seed, "cached"))


def manifest_splits(config: ExperimentConfig) -> dict[str, dict[str, Any]]:
    """Per data set, the manifest's statistics of each split (read once per run)."""
    return {name: read_manifest(config.data.root, name)["splits"] for name in config.datasets}


def train_summaries(
    config: ExperimentConfig, splits_by_name: dict[str, dict[str, Any]] | None = None
) -> dict[str, dict[str, Any]]:
    """Train-split statistics of each data set: the heads' normalisers."""
    summaries = {}
    for name, splits in (splits_by_name or manifest_splits(config)).items():
        if "train" not in splits:
            raise ValueError(f"{config.data.root}/{name}: no train split to normalise with")
        summaries[name] = splits["train"]
    return summaries


def with_data_elements(
    config: ExperimentConfig, splits_by_name: dict[str, dict[str, Any]] | None = None
) -> ExperimentConfig:
    """``config`` with ``model.params.elements`` set to every element of its data sets (all
    splits, from the manifests' element counts) where the encoder takes an element table
    (MACE) and the config leaves it open; otherwise ``config`` itself. The workers, and so the
    checkpoints, get the filled-in config: a checkpoint rebuilds the same table. A table
    given in the config must hold every element of the data (a ConfigError names the rest)."""
    params = config.model.params
    if "elements" not in {p.name for p in encoder_signature(config.model.name)}:
        return config
    found = data_elements(splits_by_name or manifest_splits(config))
    given = params.get("elements")
    if given is not None:
        missing = sorted(set(found or ()) - set(given))
        if missing:
            raise ConfigError(
                f"model.params.elements: the data sets hold atomic number(s) {missing}, "
                "not in the table; add them, or leave elements out to take the data's"
            )
        return config
    if found is None:  # an older manifest without element counts: the whole periodic table
        return config
    model = config.model.model_copy(update={"params": {**params, "elements": sorted(found)}})
    return config.model_copy(update={"model": model})


def data_elements(splits_by_name: dict[str, dict[str, Any]]) -> set[int] | None:
    """Atomic numbers in any split of any data set, or ``None`` if a manifest does not say."""
    found: set[int] = set()
    for splits in splits_by_name.values():
        for summary in splits.values():
            if "element_counts" not in summary:
                return None
            found.update(int(z) for z in summary["element_counts"])
    return found


def checkpoint_config(config: ExperimentConfig) -> ray.train.CheckpointConfig:
    """Keep the best checkpoint by the primary validation metric, and the latest.

    Ray Train ranks checkpoints by ``checkpoint_score_attribute`` (looked up as given in the
    flat metrics, so a key with '/' works; NaN ranks worst, a tie goes to the later) and keeps
    ``num_to_keep`` of them, and never deletes the latest, which restarts and ``--resume``
    continue from. ``result.checkpoint`` is the latest, ``result.best_checkpoints`` the best."""
    key, higher = primary_metric(config.tasks)
    return ray.train.CheckpointConfig(
        num_to_keep=1,
        checkpoint_score_attribute=key,
        checkpoint_score_order="max" if higher else "min",
    )


def build_trainer(
    config: ExperimentConfig,
    resume_from: Location | str | None = None,
    callbacks: list[Any] | None = None,
) -> TorchTrainer:
    """The trainer of ``config``: one data set (single- or multi-task) or several (multi-data,
    interleaved by ``data.mix``). ``callbacks`` are Ray Train callbacks (Tune's reporter).

    ``resume_from`` (a checkpoint directory) starts the run after that checkpoint's epoch,
    with its weights, optimiser and scheduler state; it must hold the same tasks and model
    (:func:`check_resume`). Ray Train V2 takes no checkpoint to start from: the path goes to
    the workers in ``train_loop_config``, and the loop loads it unless Ray hands it a later
    checkpoint of this run (a restart, or a run directory that already went further)."""
    if is_generative(config.model.name):  # its own loop: matsci_ray.generative.train
        from matsci_ray.generative.train import build_trainer as build_generative

        return build_generative(config, resume_from, callbacks)
    if resume_from is not None:  # before any cluster work: a bad path fails at once
        resume_from = resolve(location(resume_from))
        check_resume(resume_from, with_data_elements(config))
    callbacks = prepare_run(config, callbacks)  # checks model, cluster; user errors not retried
    ray.data.DataContext.get_current().enable_progress_bars = False  # per-epoch log noise
    set_controller_env(config)
    splits_by_name = manifest_splits(config)
    config = with_data_elements(config, splits_by_name)
    summaries = train_summaries(config, splits_by_name)
    datasets, sizes = run_datasets(config, splits_by_name, summaries)
    # the schedule's plan: global steps, of data.batch_size per worker at the largest size
    steps = epoch_batches(sizes, config.data.batch_size, config.run.max_workers)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "experiment": dump_config(config),
            "summaries": summaries,
            "steps_per_epoch": steps,
            "resume_from": str(resume_from) if resume_from else None,
            "order_file": order_file(config),
        },
        scaling_config=scaling_config(config),
        run_config=ray.train.RunConfig(
            name=config.name,
            **ray_storage(config.run.storage),
            failure_config=ray.train.FailureConfig(max_failures=config.run.max_failures),
            checkpoint_config=checkpoint_config(config),
            callbacks=callbacks,
        ),
        datasets=datasets,
        dataset_config=ShardedValidation(config.data.preserve_order),
    )


def run_datasets(
    config: ExperimentConfig,
    splits_by_name: dict[str, dict[str, Any]],
    summaries: dict[str, dict[str, Any]],
) -> tuple[dict[str, ray.data.Dataset], dict[str, int]]:
    """Each data set's ``train:`` and ``val:`` graph streams (small ones built once) and its
    training rows; ``summaries`` records the rows a ``data.max_train_samples`` leaves."""
    datasets: dict[str, ray.data.Dataset] = {}
    sizes: dict[str, int] = {}
    for name, splits in splits_by_name.items():
        limit = config.data.max_train_samples
        cache = should_cache(config, splits["train"])
        train = graph_dataset(config, name, "train", limit, shuffle_files=not cache)
        count = summaries[name]["records"]
        if limit:
            count = min(count, limit)
            summaries[name] = {**summaries[name], "records": count}
        if cache:
            train = cached_epochs(train, config.run.seed, epoch_order(config, name))
        val = graph_dataset(config, name, config.data.val_split, config.data.max_val_samples)
        if should_cache(config, splits.get(config.data.val_split, {})):
            # in blocks the workers' validation shards are dealt in
            val = val.repartition(target_num_rows_per_block=CACHE_BLOCK_ROWS).materialize()
        datasets[f"train:{name}"], datasets[f"val:{name}"] = train, val
        sizes[name] = count
    return datasets, sizes


def set_controller_env(config: ExperimentConfig) -> None:
    """Ray Train settings it reads from the environment, set in the driver's: Ray Train V2
    hands these variables on to its controller and workers."""
    # The controller polls workers this often, and each epoch's report waits for a poll
    # (Ray's default of 2 s cost ~0.8 s per epoch here).
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    timeout = config.run.worker_start_timeout_s
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = f"{timeout:g}"


def scaling_config(config: ExperimentConfig) -> ray.train.ScalingConfig:
    """A fixed worker count, or an elastic ``(MIN, MAX)`` range, placed packed or spread."""
    return ray.train.ScalingConfig(
        num_workers=tuple(config.run.num_workers) if config.run.elastic else config.run.num_workers,
        use_gpu=config.run.use_gpu,
        resources_per_worker=worker_bundle(config),
        placement_strategy=PLACEMENT[config.run.placement],
        elastic_resize_monitor_interval_s=config.run.elastic_resize_interval_s,
    )
