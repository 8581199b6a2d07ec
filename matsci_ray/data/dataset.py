"""Open ingested shards as Ray Datasets, by data set and split.

Every open checks the listed shards against the manifest (size and row count) and every read
verifies Parquet page checksums, naming the file on any failure (:mod:`matsci_ray.data.integrity`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data
from ray.data.datasource import FileBasedDatasource

from matsci_ray.data.integrity import Shard, check_shards, read_shard
from matsci_ray.data.manifest import read_manifest
from matsci_ray.keys import SAMPLE_ID, SPLITS
from matsci_ray.storage import Location, filesystem, location, parquet_source


def split_shards(root: Location | str, dataset: str, split: str) -> list[Shard]:
    """The shards the manifest lists for ``dataset``/``split``, each checked by a stat and its
    footer: a missing, truncated or replaced shard raises :class:`ShardError` naming it."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    manifest = read_manifest(root, dataset)
    base = location(root) / dataset
    shards = [Shard.from_manifest(base, s) for s in manifest["shards"] if s["split"] == split]
    check_shards(shards, root)
    return shards


def shard_paths(root: Location | str, dataset: str, split: str) -> list[str]:
    """Absolute paths (or URIs) of the shards the manifest lists for ``dataset``/``split``
    (checked as :func:`split_shards` does)."""
    return [s.path for s in split_shards(root, dataset, split)]


class ShardDatasource(FileBasedDatasource):
    """Ray Data source of checked shards. ``ray.data.read_parquet`` passes no page-checksum
    option to its default (V2) reader and names no file when pyarrow fails on one, so each
    file is read here through :func:`read_shard`; file listing, the per-execution seeded file
    order and read-task planning stay Ray's. Shards on an object store are read through the
    file system :mod:`matsci_ray.storage` makes (endpoint and credentials from the driver's
    environment), keyed by their path in it."""

    def __init__(
        self,
        shards: list[Shard],
        columns: list[str] | None = None,
        shuffle: ray.data.FileShuffleConfig | None = None,
    ) -> None:
        where = [filesystem(location(s.path)) for s in shards]
        paths = [path for _, path in where]
        fs = where[0][0] if where else None
        super().__init__(paths, filesystem=fs, shuffle=shuffle, file_extensions=["parquet"])
        self._columns = columns
        # by reference, as the base class keeps its paths: each read task pickles the source
        self._shards_ref = ray.put(dict(zip(paths, shards, strict=True)))
        self._shards: dict[str, Shard] | None = None

    def _expected(self, path: str) -> Shard | None:
        if self._shards is None:
            self._shards = ray.get(self._shards_ref)
        return self._shards.get(path)

    def _open_input_source(self, filesystem: Any, path: str, **open_args: Any) -> pa.NativeFile:
        return filesystem.open_input_file(path)  # Parquet needs random access, not a stream

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        expected = self._expected(path)
        yield from read_shard(f, expected.path if expected else path, self._columns, expected)

    def get_name(self) -> str:
        return "Shards"  # Ray Data names the operator "Read" + this


def open_dataset(
    root: Location | str,
    dataset: str,
    split: str,
    columns: list[str] | None = None,
    num_cpus: float | None = None,
    shuffle_seed: int | ray.data.FileShuffleConfig | None = None,
) -> ray.data.Dataset:
    """Stream the ``split`` shards of ``dataset`` as a Ray Dataset (nothing is loaded eagerly).

    ``num_cpus`` is what each read task asks of the scheduler (default: Ray's, one CPU).
    ``shuffle_seed`` reads the shard files in a seeded order that changes with every
    execution (each training epoch): shards follow the input files (an OC20 system, a chunk of
    MP documents), so a fixed order would sweep the same groups in the same sequence each epoch.
    A ``FileShuffleConfig`` is used as given (training passes one seeded per epoch,
    ``train.data_order.EpochFileShuffle``).
    """
    shards = split_shards(root, dataset, split)
    if not shards:
        raise ValueError(f"{root}/{dataset}: no records in split {split!r}")
    shuffle = shuffle_seed if isinstance(shuffle_seed, ray.data.FileShuffleConfig) else None
    if isinstance(shuffle_seed, int):
        shuffle = ray.data.FileShuffleConfig(seed=shuffle_seed, reseed_after_execution=True)
    source = ShardDatasource(shards, columns, shuffle)
    return ray.data.read_datasource(source, num_cpus=num_cpus)


def open_datasets(
    root: Location | str, datasets: list[str], split: str, columns: list[str] | None = None
) -> dict[str, ray.data.Dataset]:
    """One Ray Dataset per data set name, for the mixed-dataset sampler."""
    return {name: open_dataset(root, name, split, columns) for name in datasets}


def _id_hashes(ids: list[str], seed: int) -> np.ndarray:
    """A seeded 64-bit hash per sample id: the order in which rows are drawn."""
    return np.array(
        [
            int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest(), "big")
            for i in ids
        ],
        dtype=np.uint64,
    )


class SampledRows:
    """``map_batches`` filter keeping the rows whose sample id is in ``ids`` (a vectorised
    Arrow lookup per batch); pyarrow tables in and out."""

    def __init__(self, ids: list[str]) -> None:
        self.ids = pa.array(ids, type=pa.string())

    def __call__(self, table: pa.Table) -> pa.Table:
        return table.filter(pc.is_in(table.column(SAMPLE_ID), value_set=self.ids))


def sample_rows(
    ds: ray.data.Dataset,
    root: Location | str,
    dataset: str,
    split: str,
    count: int,
    seed: int,
    num_cpus: float | None = None,
) -> ray.data.Dataset:
    """Exactly ``count`` rows of ``ds`` (the stream of ``dataset``/``split``), drawn uniformly
    across all its shards: those whose seeded sample-id hash is among the ``count`` smallest.

    Only the sample-id column is read and hashed up front, once per run; the rows themselves
    still stream, the same rows every epoch. The first ``count`` rows would instead be the
    first few systems of a shard (an OC20 epoch of 640 frames saw 4 of 20 training systems).
    """
    ids = [
        i
        for shard in split_shards(root, dataset, split)
        for table in read_shard(parquet_source(location(shard.path)), shard.path, [SAMPLE_ID])
        for i in table.column(SAMPLE_ID).to_pylist()
    ]
    if count >= len(ids):
        return ds
    chosen = np.argpartition(_id_hashes(ids, seed), count - 1)[:count]
    keep = SampledRows([ids[i] for i in chosen])
    return ds.map_batches(keep, batch_format="pyarrow", num_cpus=num_cpus)
