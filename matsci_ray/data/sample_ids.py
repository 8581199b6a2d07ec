"""``sample_id`` is unique within a data set: the driver's check across work units.

Each unit rejects a repeated id within itself (:func:`matsci_ray.data.shards.ingest_unit`);
ids from different units can only meet here. Most readers build ids from the input id
(``SourceReader.inputs`` already refuses two files with one), but some take them from the
content (Materials Project ids, OC20 extxyz sidecars), so two files, or two chunks of one
file, may still hold the same record. One Ray task per unit hashes the ``sample_id`` column
of its shards to 64 bits; the driver sorts the hashes and confirms any equal pair by
comparing the two units' ids as strings, so a hash collision never fails an ingest.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow.parquet as pq
import ray

from matsci_ray import keys as K
from matsci_ray.data.record import SourceError, WorkUnit
from matsci_ray.storage import Location, filesystem


def unit_ids(dataset_dir: Location, sidecar: dict[str, Any]) -> list[str]:
    """The sample ids one unit wrote, over all its splits' shards."""
    where = [filesystem(dataset_dir / s["path"]) for s in sidecar["shards"].values()]
    if not where:
        return []
    paths = [path for _, path in where]
    table = pq.read_table(paths, columns=[K.SAMPLE_ID], filesystem=where[0][0])
    return table[K.SAMPLE_ID].to_pylist()


def unit_id_hashes(dataset_dir: Location, sidecar: dict[str, Any]) -> np.ndarray:
    """64-bit hashes of :func:`unit_ids` (pandas' SipHash with its fixed key: deterministic)."""
    from pandas.util import hash_array

    ids = unit_ids(dataset_dir, sidecar)
    return hash_array(np.asarray(ids, dtype=object)) if ids else np.empty(0, np.uint64)


def check_unique_ids(
    dataset_dir: Location,
    units: list[WorkUnit],
    sidecars: list[dict[str, Any]],
    task_cpus: float = 1.0,
) -> None:
    """Raise :class:`SourceError` naming both files if two units wrote the same sample_id.

    ``sidecars[i]`` is the sidecar of ``units[i]``.
    """
    task = ray.remote(num_cpus=task_cpus)(unit_id_hashes)
    hashes = ray.get([task.remote(dataset_dir, sidecar) for sidecar in sidecars])
    owner = np.repeat(np.arange(len(units)), [len(h) for h in hashes])
    flat = np.concatenate(hashes) if hashes else np.empty(0, np.uint64)
    order = np.argsort(flat, kind="stable")  # stable: equal hashes keep unit order
    ranked = flat[order]
    ids: dict[int, set[str]] = {}
    for i in np.flatnonzero(ranked[1:] == ranked[:-1]):
        first, second = int(owner[order[i]]), int(owner[order[i + 1]])
        if first == second:
            continue  # a collision of two different ids: a unit's own ids are unique
        for u in (first, second):
            if u not in ids:
                ids[u] = set(unit_ids(dataset_dir, sidecars[u]))
        common = ids[first] & ids[second]
        if common:
            raise _duplicate(min(common), units[first], units[second])


def _duplicate(sample_id: str, first: WorkUnit, second: WorkUnit) -> SourceError:
    where = "twice in it" if first.file == second.file else f"also in {first.file}"
    return SourceError(
        second.file,
        f"sample_id {sample_id!r} is {where}: sample ids must be unique within a data set "
        "(the same record read twice?)",
    )
