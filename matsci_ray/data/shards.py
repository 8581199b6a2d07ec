"""Ingest one work unit into Parquet shards: read, validate, split, write, account.

Crash safety: shards are written to ``*.tmp`` and renamed into place; the unit's sidecar JSON,
written last and atomically, is the commit record. A unit without a sidecar is redone from
scratch on the next run, overwriting whatever it left, so a killed ingest resumes to the same
bytes with no record missing or duplicated.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from matsci_ray.data.integrity import WRITE_OPTIONS, describe
from matsci_ray.data.readers import get_reader
from matsci_ray.data.record import Record, Reject, SourceError, WorkUnit
from matsci_ray.data.schema import SCHEMA, SCHEMA_VERSION, records_to_table
from matsci_ray.data.splits import SplitConfig, Splitter
from matsci_ray.data.stats import SplitStats
from matsci_ray.data.validate import Limits, check_record
from matsci_ray.errors import StrictModeError
from matsci_ray.keys import SPLITS
from matsci_ray.storage import Location, is_remote, read_text, remove, upload, write_text

UNITS_DIR = "_units"


@dataclass(frozen=True)
class IngestOptions:
    """Everything that decides an ingest's output; its fingerprint invalidates stale units."""

    source: str
    reader_options: dict[str, Any] = field(default_factory=dict)
    split: SplitConfig = field(default_factory=SplitConfig)
    limits: Limits = field(default_factory=Limits)
    strict: bool = False
    row_group_size: int = 1024
    id_split_name: str | None = None  # which id split was applied (its directory), for the record

    def fingerprint(self) -> str:
        import hashlib

        payload = json.dumps(
            {**asdict(self), "schema_version": SCHEMA_VERSION}, sort_keys=True, default=str
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def unit_name(unit: WorkUnit) -> str:
    """Readable, unique, deterministic shard stem: ``<file stem>-<start>-<hash>``."""
    stem = Path(unit.file).name.split(".")[0]
    return f"{stem}-{unit.start:010d}-{unit.unit_id[:8]}"


def write_json_atomic(path: Location, data: Any) -> None:
    write_text(path, json.dumps(data, indent=1, sort_keys=True))


class _SplitWriter:
    """Buffers validated records of one split and writes them as Parquet row groups.

    A shard bound for an object store is written to a local scratch file first, hashed there
    and uploaded whole at close: the manifest's SHA-256 needs no second download."""

    def __init__(self, path: Location, row_group_size: int) -> None:
        self.path = path
        self.scratch = Path(tempfile.mkdtemp(prefix="shard-")) if is_remote(path) else None
        self.local = self.scratch / path.name if self.scratch else Path(path)
        self.tmp = self.local.with_name(self.local.name + ".tmp")
        self.row_group_size = row_group_size
        self.buffer: list[Record] = []
        self.rows = 0
        self.writer: pq.ParquetWriter | None = None

    def add(self, record: Record, split: str) -> None:
        self.buffer.append(record)
        if len(self.buffer) >= self.row_group_size:
            self.flush(split)

    def flush(self, split: str) -> None:
        if not self.buffer:
            return
        if self.writer is None:
            self.local.parent.mkdir(parents=True, exist_ok=True)
            self.writer = pq.ParquetWriter(self.tmp, SCHEMA, **WRITE_OPTIONS)
        table: pa.Table = records_to_table(self.buffer, split)
        self.writer.write_table(table, row_group_size=len(self.buffer))
        self.rows += len(self.buffer)
        self.buffer.clear()

    def close(self, split: str) -> dict[str, Any]:
        """Finish the shard; its manifest entry (rows, bytes, SHA-256 of the final file)."""
        self.flush(split)
        if self.writer is not None:
            self.writer.close()
            os.replace(self.tmp, self.local)
        entry = describe(self.local, self.rows)
        if self.scratch is not None:
            upload(self.local, self.path)
            shutil.rmtree(self.scratch)
        return entry


def _remove_unit_shards(dataset_dir: Location, name: str) -> None:
    """Delete what an earlier, different run of unit ``name`` wrote (an object store is not
    listed per unit: its shards can only sit at one name per split, no ``.tmp`` there)."""
    if isinstance(dataset_dir, Path):
        for stale in dataset_dir.glob(f"*/part-{name}.parquet*"):
            stale.unlink()
        return
    for split in SPLITS:
        remove(dataset_dir / split / f"part-{name}.parquet")


def ingest_unit(
    unit: WorkUnit,
    dataset_dir: Location,
    options: IngestOptions,
    input_sha256: str,
    id_split: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Ingest ``unit`` into ``dataset_dir/<split>/part-<unit>.parquet``; return its sidecar."""
    name = unit_name(unit)
    _remove_unit_shards(dataset_dir, name)  # an earlier, different run of this unit
    reader = get_reader(options.source, **options.reader_options)
    splitter = Splitter(options.split, id_split)
    writers: dict[str, _SplitWriter] = {}
    stats: dict[str, SplitStats] = {}
    rejects: list[Reject] = []
    split_how: Counter[str] = Counter()
    seen_ids: set[str] = set()

    for item in reader.read(unit):
        if isinstance(item, Record):
            reason = check_record(item, options.limits)
            if reason is None and item.sample_id in seen_ids:
                reason = f"duplicate: sample_id {item.sample_id} already read from this unit"
            if reason is not None:
                item = Reject(
                    item.source_file or unit.file, item.source_key or item.sample_id, reason
                )
        if isinstance(item, Reject):
            if options.strict:
                raise StrictModeError(f"{item.file} [record {item.key}]: {item.reason}")
            rejects.append(item)
            continue
        seen_ids.add(item.sample_id)
        if item.split is not None:  # the source's own split wins over ids and hashing
            split, how = item.split, "source"
        else:
            split, how = splitter(item.group or item.sample_id, item.material_id)
        split_how[how] += 1
        if split not in writers:
            writers[split] = _SplitWriter(
                dataset_dir / split / f"part-{name}.parquet", options.row_group_size
            )
            stats[split] = SplitStats()
        writers[split].add(item, split)
        stats[split].add(np.asarray(item.atomic_numbers), item.targets)

    written = {split: writer.close(split) for split, writer in sorted(writers.items())}
    sidecar = {
        "unit": asdict(unit),
        "name": name,
        "input_sha256": input_sha256,
        "fingerprint": options.fingerprint(),
        "shards": {
            s: {"path": f"{s}/{writers[s].path.name}", **entry} for s, entry in written.items()
        },
        "rejects": [asdict(r) for r in rejects],
        "split_how": dict(split_how),
        "stats": {s: st.to_json() for s, st in sorted(stats.items())},
    }
    write_json_atomic(dataset_dir / UNITS_DIR / f"{name}.json", sidecar)
    return sidecar


def load_sidecar(dataset_dir: Location, unit: WorkUnit) -> dict[str, Any] | None:
    path = dataset_dir / UNITS_DIR / f"{unit_name(unit)}.json"
    try:
        return json.loads(read_text(path))
    except FileNotFoundError:
        return None
    except json.JSONDecodeError:
        return None  # torn write from a crash before os.replace cannot happen; be safe anyway


__all__ = ["IngestOptions", "SourceError", "StrictModeError", "ingest_unit", "load_sidecar"]
