"""``matsci-ray ingest``: sources → validated Parquet shards, in parallel on Ray.

One Ray task per input file plans it (checksum, work units); one Ray task per work unit streams
it into shards (:mod:`matsci_ray.data.shards`). Units already committed by an earlier run with
the same inputs and options are skipped, which is what makes ingest resumable. Before the
manifest is written the driver checks that every input yielded a record and that no sample_id
repeats across units (:mod:`matsci_ray.data.sample_ids`).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import ray
from tqdm.auto import tqdm

from matsci_ray.data.integrity import sha256_file
from matsci_ray.data.manifest import build_manifest, write_manifest
from matsci_ray.data.readers import get_reader
from matsci_ray.data.record import SourceError, WorkUnit
from matsci_ray.data.sample_ids import check_unique_ids
from matsci_ray.data.shards import (
    UNITS_DIR,
    IngestOptions,
    StrictModeError,
    ingest_unit,
    load_sidecar,
    unit_name,
)
from matsci_ray.data.splits import load_id_split
from matsci_ray.errors import user_facing
from matsci_ray.storage import Location, files_under, location, remove, resolve

log = logging.getLogger(__name__)


def _plan_file(
    options: IngestOptions, file: str, input_id: str = ""
) -> tuple[list[WorkUnit], dict[str, Any]]:
    """Work units of ``file`` (carrying its ``input_id``) and its checksum.

    An input with nothing to read is an error, not 0 records: it is more likely a failed
    download or copy than a file meant to be empty.
    """
    path = Path(file)
    size = path.stat().st_size
    if size == 0:
        raise SourceError(file, "empty file (0 bytes)")
    reader = get_reader(options.source, **options.reader_options)
    units = [replace(unit, input_id=input_id) for unit in reader.plan(path)]
    if not units:
        raise SourceError(file, "empty: no records in it")
    info = {"file": file, "bytes": size, "sha256": sha256_file(path)}
    return units, info


def _check_not_empty(units: list[WorkUnit], sidecars: dict[str, dict[str, Any]]) -> None:
    """A file whose units yielded no record at all (neither written nor rejected) is empty.

    Catches what planning cannot count, e.g. a gzipped file of blank lines (one unit).
    """
    found: dict[str, int] = {}
    for unit in units:
        sidecar = sidecars[unit_name(unit)]
        rows = sum(shard["rows"] for shard in sidecar["shards"].values())
        found[unit.file] = found.get(unit.file, 0) + rows + len(sidecar["rejects"])
    for file, count in found.items():
        if count == 0:
            raise SourceError(file, "empty: no records in it")


def run_ingest(
    source: str,
    paths: list[Path],
    out: Location | str,
    options: IngestOptions,
    *,
    id_split_dir: Path | None = None,
    task_cpus: float = 1.0,
    progress: bool = True,
    on_unit_done: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Ingest ``paths`` of ``source`` into ``out``; returns the data set's manifest.

    Needs a running Ray (``ray.init``); the CLI starts a local one unless told an address.
    Re-ingesting a source into the same ``out`` (a directory or an object-store URI) replaces
    that data set's shards.
    """
    out = resolve(location(out))
    reader = get_reader(source, **options.reader_options)
    named = reader.inputs([Path(p) for p in paths])
    dataset_dir = out / reader.dataset
    id_split = load_id_split(id_split_dir) if id_split_dir is not None else None

    plan_task = ray.remote(num_cpus=task_cpus)(_plan_file)
    try:
        planned = ray.get([plan_task.remote(options, str(f), name) for f, name in named])
    except ray.exceptions.RayTaskError as error:
        raise user_facing(error) or error from None
    units = [u for file_units, _ in planned for u in file_units]
    inputs = [info for _, info in planned]
    checksum = {info["file"]: info["sha256"] for info in inputs}

    sidecars: dict[str, dict[str, Any]] = {}
    todo: list[WorkUnit] = []
    for unit in units:
        done = load_sidecar(dataset_dir, unit)
        if (
            done
            and done["fingerprint"] == options.fingerprint()
            and done["input_sha256"] == checksum[unit.file]
            and done["unit"] == asdict(unit)  # same slice and input id (hence sample ids)
        ):
            sidecars[unit_name(unit)] = done
        else:
            todo.append(unit)
    if sidecars:
        log.info("resuming: %d of %d units already ingested", len(sidecars), len(units))

    unit_task = ray.remote(num_cpus=task_cpus, max_retries=0)(ingest_unit)
    split_ref = ray.put(id_split)
    pending = {
        unit_task.remote(u, dataset_dir, options, checksum[u.file], split_ref): u for u in todo
    }
    bar = tqdm(
        total=len(units),
        initial=len(sidecars),
        unit="unit",
        disable=not progress,
        desc=f"ingest {source}",
    )
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            unit = pending.pop(ready[0])
            try:
                sidecar = ray.get(ready[0])
            except ray.exceptions.RayTaskError as error:
                raise user_facing(error) or error from None
            sidecars[unit_name(unit)] = sidecar
            if on_unit_done is not None:
                on_unit_done(sidecar)
            bar.update(1)
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    finally:
        bar.close()

    _remove_stale(dataset_dir, {unit_name(u) for u in units})
    _check_not_empty(units, sidecars)
    ordered = [sidecars[unit_name(u)] for u in units]
    check_unique_ids(dataset_dir, units, ordered, task_cpus)
    manifest = build_manifest(reader.dataset, options, inputs, ordered)
    write_manifest(out, reader.dataset, manifest)
    return manifest


def _remove_stale(dataset_dir: Location, current: set[str]) -> None:
    """Delete shards and sidecars of units that are no longer part of this data set."""
    if not isinstance(dataset_dir, Path):  # one listing; an object store has no directories
        for file in files_under(dataset_dir):
            parent = file.parent.name
            if parent == UNITS_DIR and file.name.endswith(".json"):
                stem = file.name.removesuffix(".json")
            elif file.name.startswith("part-") and parent != UNITS_DIR:
                stem = file.name.removeprefix("part-").split(".parquet")[0]
            else:
                continue
            if stem not in current:
                remove(file)
        return
    for path in dataset_dir.glob("*/part-*.parquet*"):
        if path.name.removeprefix("part-").split(".parquet")[0] not in current:
            path.unlink()
    for path in (dataset_dir / UNITS_DIR).glob("*.json"):
        if path.stem not in current:
            path.unlink()
    for split_dir in dataset_dir.iterdir():
        if split_dir.is_dir() and split_dir.name != UNITS_DIR and not any(split_dir.iterdir()):
            shutil.rmtree(split_dir)


__all__ = ["IngestOptions", "SourceError", "StrictModeError", "run_ingest"]
