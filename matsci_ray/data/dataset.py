"""Open ingested shards as Ray Datasets, by data set and split."""

from __future__ import annotations

from pathlib import Path

import ray.data

from matsci_ray.data.manifest import read_manifest
from matsci_ray.keys import SPLITS


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
) -> ray.data.Dataset:
    """Stream the ``split`` shards of ``dataset`` as a Ray Dataset (nothing is loaded eagerly).

    ``num_cpus`` is what each read task asks of the scheduler (default: Ray's, one CPU).
    """
    paths = shard_paths(root, dataset, split)
    if not paths:
        raise ValueError(f"{root}/{dataset}: no records in split {split!r}")
    return ray.data.read_parquet(paths, columns=columns, num_cpus=num_cpus)


def open_datasets(
    root: Path | str, datasets: list[str], split: str, columns: list[str] | None = None
) -> dict[str, ray.data.Dataset]:
    """One Ray Dataset per data set name, for the mixed-dataset sampler."""
    return {name: open_dataset(root, name, split, columns) for name in datasets}
