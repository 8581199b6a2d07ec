"""Open ingested shards as Ray Datasets, by data set and split."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray.data

from matsci_ray.data.manifest import read_manifest
from matsci_ray.keys import SAMPLE_ID, SPLITS


def shard_paths(root: Path | str, dataset: str, split: str) -> list[str]:
    """Absolute paths of the shards the manifest lists for ``dataset``/``split``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    manifest = read_manifest(Path(root), dataset)
    base = Path(root) / dataset
    paths = [str(base / s["path"]) for s in manifest["shards"] if s["split"] == split]
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise FileNotFoundError(f"{missing[0]}: shard listed in the manifest is missing; re-ingest")
    return paths


def open_dataset(
    root: Path | str,
    dataset: str,
    split: str,
    columns: list[str] | None = None,
    num_cpus: float | None = None,
    shuffle_seed: int | None = None,
) -> ray.data.Dataset:
    """Stream the ``split`` shards of ``dataset`` as a Ray Dataset (nothing is loaded eagerly).

    ``num_cpus`` is what each read task asks of the scheduler (default: Ray's, one CPU).
    ``shuffle_seed`` reads the shard files in a seeded order that changes with every
    execution (each training epoch): shards follow the input files (an OC20 system, a chunk of
    MP documents), so a fixed order would sweep the same groups in the same sequence each epoch.
    """
    paths = shard_paths(root, dataset, split)
    if not paths:
        raise ValueError(f"{root}/{dataset}: no records in split {split!r}")
    shuffle = None
    if shuffle_seed is not None:
        shuffle = ray.data.FileShuffleConfig(seed=shuffle_seed, reseed_after_execution=True)
    return ray.data.read_parquet(paths, columns=columns, num_cpus=num_cpus, shuffle=shuffle)


def open_datasets(
    root: Path | str, datasets: list[str], split: str, columns: list[str] | None = None
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
    root: Path | str,
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
        for p in shard_paths(root, dataset, split)
        for i in pq.read_table(p, columns=[SAMPLE_ID])[SAMPLE_ID].to_pylist()
    ]
    if count >= len(ids):
        return ds
    chosen = np.argpartition(_id_hashes(ids, seed), count - 1)[:count]
    keep = SampledRows([ids[i] for i in chosen])
    return ds.map_batches(keep, batch_format="pyarrow", num_cpus=num_cpus)
