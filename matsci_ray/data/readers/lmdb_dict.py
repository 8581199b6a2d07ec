"""Base of readers whose LMDB values are plain dicts converted by one function per record."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

from matsci_ray.data.readers.base import SourceReader
from matsci_ray.data.readers.lmdb_source import (
    DEFAULT_CHUNK_SIZE,
    RecordRejected,
    iter_lmdb,
    plan_lmdb,
)
from matsci_ray.data.record import Record, Reject, WorkUnit


class LMDBDictReader(SourceReader):
    """Streams ``convert(value)`` over an LMDB's records; a ``RecordRejected`` becomes a
    :class:`Reject` naming the file and key. Subclasses set ``convert`` to a plain function."""

    suffixes: ClassVar[tuple[str, ...]] = (".lmdb",)
    convert: ClassVar[Callable[[dict[str, Any]], dict[str, Any]]]

    def __init__(self, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        self.chunk_size = chunk_size

    def plan(self, file: Path) -> list[WorkUnit]:
        return plan_lmdb(self.name, file, self.chunk_size)

    def read(self, unit: WorkUnit) -> Iterator[Record | Reject]:
        prefix = unit.sample_prefix
        convert = type(self).convert
        for key, record in iter_lmdb(unit):
            try:
                fields = convert(record)
            except RecordRejected as exc:
                yield Reject(unit.file, key, str(exc))
                continue
            yield Record(
                dataset=self.dataset,
                sample_id=f"{prefix}:{key}",
                source_file=unit.file,
                source_key=key,
                **fields,
            )
