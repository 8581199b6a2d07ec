"""Shard integrity: what the manifest records of each shard, and the checks made against it.

Ingest records every shard's row count, size and SHA-256 in the manifest and writes a CRC32
checksum into every Parquet page. Three checks use them, from cheap to thorough:

- opening a split (training, evaluation) stats each shard and reads its footer: a missing,
  truncated or replaced shard fails there, named, before any Ray task starts;
- every read verifies the page checksums, so bytes flipped inside a column fail the read
  instead of moving an atom silently, and any read error names the file;
- ``matsci-ray verify`` hashes every shard and names each one that differs from the manifest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from matsci_ray import keys as K
from matsci_ray.errors import ShardError, one_line
from matsci_ray.storage import Location, absolute, location, open_stream, parquet_source
from matsci_ray.storage import size as file_size

HASH_CHUNK = 1 << 22  # hashed in 4 MiB blocks: a shard is never held in memory whole
# Parquet writer options of every shard: a CRC32 per page, checked by every read.
WRITE_OPTIONS: dict[str, Any] = {"compression": "zstd", "write_page_checksum": True}
REPAIR = "re-ingest to repair"


def sha256_file(path: Path | str, chunk: int = HASH_CHUNK) -> str:
    """Hex SHA-256 of a file (local, or a URI), read in blocks of ``chunk`` bytes."""
    digest = hashlib.sha256()
    with open_stream(location(path)) as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Shard:
    """One shard as the manifest lists it. ``size`` and ``sha256`` are ``None`` in a manifest
    written by hand without them (``benchmarks/train.py``'s replicated splits): their checks
    are then skipped at open and reported by verify."""

    path: str  # absolute, or a URI
    split: str
    rows: int
    size: int | None = None
    sha256: str | None = None

    @classmethod
    def from_manifest(cls, dataset_dir: Location | str, entry: dict[str, Any]) -> Shard:
        # absolute: read tasks' working directory differs
        return cls(
            path=str(absolute(location(dataset_dir) / entry["path"])),
            split=entry["split"],
            rows=int(entry["rows"]),
            size=entry.get("bytes"),
            sha256=entry.get("sha256"),
        )


def describe(path: Path | str, rows: int) -> dict[str, Any]:
    """The manifest's record of a finished shard file: rows, bytes and SHA-256."""
    return {"rows": rows, "bytes": Path(path).stat().st_size, "sha256": sha256_file(path)}


def _reason(error: BaseException, path: Path | str) -> str:
    """pyarrow's message in one line, without the path it sometimes repeats."""
    return one_line(error).split(f"'{path}': ")[-1]


def quick_problem(shard: Shard) -> str | None:
    """What a stat and the Parquet footer show wrong with ``shard`` (``None``: nothing).
    Cheap enough for every open of a split: no data page is read."""
    path = location(shard.path)
    size = file_size(path)
    if size is None:
        return "missing"
    if shard.size is not None and size != shard.size:
        return f"size {size} bytes, the manifest says {shard.size}"
    try:
        rows = pq.read_metadata(parquet_source(path)).num_rows
    except (OSError, pa.ArrowException) as error:
        return f"unreadable ({_reason(error, path)})"
    if rows != shard.rows:
        return f"{rows} rows, the manifest says {shard.rows}"
    return None


def check_shards(shards: Iterable[Shard], root: Path | str) -> None:
    """Raise :class:`ShardError` naming the first shard whose size or row count is not the
    manifest's (or that is missing or has no readable footer)."""
    for shard in shards:
        problem = quick_problem(shard)
        if problem is not None:
            raise ShardError(
                f"{shard.path}: {problem}; not the shard ingest wrote "
                f"(`matsci-ray verify {root}` checks every shard; {REPAIR})"
            )


def _content_problems(shard: Shard, dataset: str) -> list[str]:
    """Why a shard whose bytes are not the recorded ones is bad: a page fails its checksum
    (flipped bytes), or its rows belong to another split or data set (a copied shard). Reads
    the whole file, one row group at a time: only for shards already known to differ."""
    owners = {K.SPLIT: (shard.split, "split"), K.DATASET: (dataset, "data set")}
    strangers: dict[str, set[str]] = {column: set() for column in owners}
    try:
        source = parquet_source(location(shard.path))
        reader = pq.ParquetFile(source, page_checksum_verification=True)
        for group in range(reader.num_row_groups):
            table = reader.read_row_group(group)  # every column: every page's CRC is checked
            for column, (expected, _) in owners.items():
                strangers[column].update(set(table.column(column).to_pylist()) - {expected})
    except (OSError, pa.ArrowException) as error:
        return [f"unreadable ({_reason(error, shard.path)})"]
    return [
        f"holds rows of {what} {', '.join(map(repr, sorted(strangers[column])))}"
        for column, (_, what) in owners.items()
        if strangers[column]
    ]


def verify_shard(shard: Shard, dataset: str) -> list[str]:
    """Everything wrong with ``shard`` (empty: it is byte for byte what ingest wrote)."""
    problem = quick_problem(shard)
    if problem is not None:  # the hash cannot match: say what else is wrong instead
        if problem == "missing" or problem.startswith("unreadable"):
            return [problem]
        return [problem, *_content_problems(shard, dataset)]
    if shard.sha256 is None:
        return ["the manifest records no sha256 to check it against"]
    if sha256_file(shard.path) == shard.sha256:
        return []
    return ["sha256 differs from the manifest's", *_content_problems(shard, dataset)]


def read_shard(
    source: pa.NativeFile | str,
    path: str,
    columns: list[str] | None = None,
    expected: Shard | None = None,
) -> Iterator[pa.Table]:
    """Row groups of one shard, page checksums verified; any failure is a :class:`ShardError`
    naming ``path`` (pyarrow's own messages name no file). ``expected`` re-checks the size
    and row count at read time: a shard replaced after the split was opened (a re-ingest
    during a run) fails instead of mixing two ingests."""
    try:
        reader = pq.ParquetFile(source, page_checksum_verification=True)
        if expected is not None:
            _check_open_file(source, path, expected, reader.metadata.num_rows)
        for group in range(reader.num_row_groups):
            yield reader.read_row_group(group, columns=columns)
    except (OSError, pa.ArrowException) as error:
        raise ShardError(f"{path}: unreadable shard ({_reason(error, path)}); {REPAIR}") from None


def _check_open_file(source: pa.NativeFile | str, path: str, shard: Shard, rows: int) -> None:
    size = source.size() if isinstance(source, pa.NativeFile) else file_size(location(path))
    if shard.size is not None and size != shard.size:
        raise ShardError(
            f"{path}: size {size} bytes, the manifest says {shard.size} "
            f"(changed since the split was opened); {REPAIR}"
        )
    if rows != shard.rows:
        raise ShardError(
            f"{path}: {rows} rows, the manifest says {shard.rows} "
            f"(changed since the split was opened); {REPAIR}"
        )


def verify_dataset(
    dataset_dir: Location, manifest: dict[str, Any], quick: bool = False
) -> Iterator[tuple[str, list[str]]]:
    """``(path, problems)`` of every shard ``manifest`` lists (no problems: the shard is good).
    ``quick``: sizes, footers and row counts only, as opening a split checks; no hashing."""
    for entry in manifest["shards"]:
        shard = Shard.from_manifest(dataset_dir, entry)
        if quick:
            problem = quick_problem(shard)
            yield shard.path, [problem] if problem is not None else []
        else:
            yield shard.path, verify_shard(shard, manifest["dataset"])
