"""Where data and runs live: a local path, or an object-store URI (``s3://bucket/prefix``,
``gs://bucket/prefix``, any URI pyarrow's ``FileSystem.from_uri`` knows).

A location is a :class:`~pathlib.Path` (local, exactly as before) or a :class:`Uri`; both
join with ``/`` and have ``name`` and ``parent``. Every file operation on a location goes
through this module: local paths take the plain ``os``/``pathlib`` route (no pyarrow on the
way, so local runs cost what they did), URIs a pyarrow file system made once per process and
bucket (:mod:`matsci_ray.buckets`). Credentials and endpoint come from the environment
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
``AWS_DEFAULT_REGION``/``AWS_REGION``, ``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3`` for MinIO
and other S3-compatible stores; Google's default credentials for ``gs://``), and the first
use of a bucket checks it: one :class:`~matsci_ray.errors.StorageError` line on what is wrong.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import PlainSerializer, PlainValidator, WithJsonSchema

from matsci_ray import buckets
from matsci_ray.errors import StorageError

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.fs as pafs


@dataclass(frozen=True)
class Uri:
    """An object-store location, ``scheme://bucket/key`` (no trailing slash). Deliberately not
    path-like (no ``__fspath__``): ``open(uri)`` fails instead of writing a local file."""

    text: str

    def __post_init__(self) -> None:
        scheme, sep, rest = self.text.partition("://")
        if not sep or not scheme or not rest.strip("/"):
            raise StorageError(f"{self.text}: not a URI of the form scheme://bucket/path")
        object.__setattr__(self, "text", f"{scheme.lower()}://{rest.strip('/')}")

    @property
    def scheme(self) -> str:
        return self.text.partition("://")[0]

    @property
    def key(self) -> str:
        """``bucket/path``: the path inside the scheme's file system."""
        return self.text.partition("://")[2]

    @property
    def bucket(self) -> str:
        return self.key.split("/", 1)[0]

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def parent(self) -> Uri:
        head = self.key.rsplit("/", 1)[0] if "/" in self.key else self.key
        return Uri(f"{self.scheme}://{head}")

    @property
    def parents(self) -> list[Uri]:
        found, current = [], self
        while "/" in current.key:
            current = current.parent
            found.append(current)
        return found

    def __truediv__(self, part: str | os.PathLike[str]) -> Uri:
        return Uri(f"{self.text}/{str(part).strip('/')}")

    def __str__(self) -> str:
        return self.text


Location = Path | Uri


def location(value: str | os.PathLike[str] | Location) -> Location:
    """``value`` as a location: a :class:`Uri` when it has a ``scheme://`` (``file://`` is a
    local path), else a ``Path`` (not resolved)."""
    if isinstance(value, Uri | Path):
        return value
    text = os.fspath(value)
    if "://" not in text:
        return Path(text)
    if text.lower().startswith("file://"):
        return Path(text[len("file://") :])
    return Uri(text)


def resolve(loc: Location) -> Location:
    """A local path made absolute (read tasks run in other directories); a URI as it is."""
    return loc.resolve() if isinstance(loc, Path) else loc


def absolute(loc: Location) -> Location:
    """A local path made absolute without resolving links (``os.path.abspath``)."""
    return Path(os.path.abspath(loc)) if isinstance(loc, Path) else loc


def is_remote(loc: Location) -> bool:
    return isinstance(loc, Uri)


def _validate(value: Any) -> Location:
    if not isinstance(value, str | os.PathLike):
        raise ValueError(f"expected a path or URI, got {type(value).__name__}")
    try:
        return location(value)
    except StorageError as error:
        raise ValueError(str(error)) from None


# A config field holding a location: a local path or a URI, written back as a string.
LocationField = Annotated[
    Location,
    PlainValidator(_validate),
    PlainSerializer(str, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "description": "local path or URI (s3://bucket/prefix)"}),
]


# --- file systems --------------------------------------------------------------------------


def filesystem(loc: Location) -> tuple[pafs.FileSystem, str]:
    """The pyarrow file system of ``loc`` and its path there (local: the path as given)."""
    import pyarrow.fs as pafs

    if isinstance(loc, Path):
        return _local(), str(loc)
    if loc.scheme == "s3":
        return buckets.s3_filesystem(loc.bucket, buckets.environment()), loc.key
    if loc.scheme in ("gs", "gcs"):
        return buckets.gcs_filesystem(loc.bucket, buckets.environment()), loc.key
    try:
        fs, path = pafs.FileSystem.from_uri(loc.text)
    except (OSError, ValueError) as error:
        raise StorageError(f"{loc}: {buckets.first_line(error)}") from None
    return fs, path


@functools.cache
def _local() -> pafs.FileSystem:
    import pyarrow.fs as pafs

    return pafs.LocalFileSystem()


def check(*locs: Location) -> None:
    """Fail now, in one line, on a location that cannot be used (unreachable endpoint, no
    credentials, missing bucket): before Ray starts, not in its first task."""
    for loc in locs:
        if isinstance(loc, Uri):
            filesystem(loc)


def ray_storage(loc: Location) -> dict[str, Any]:
    """Ray Train's and Tune's ``storage_path``, with ``storage_filesystem`` for an object
    store: Ray then writes checkpoints there itself, through the file system made here."""
    if isinstance(loc, Path):
        return {"storage_path": str(loc)}
    fs, path = filesystem(loc)
    return {"storage_path": path, "storage_filesystem": fs}


def uri_of(fs: pafs.FileSystem, path: str) -> str:
    """What a user types for ``path`` on ``fs`` (Ray Train's checkpoint paths have no scheme)."""
    scheme = {"s3": "s3", "gcs": "gs", "local": ""}.get(fs.type_name, fs.type_name)
    return f"{scheme}://{path}" if scheme else path


# --- file operations -------------------------------------------------------------------------


def exists(loc: Location) -> bool:
    if isinstance(loc, Path):
        return loc.exists()
    return _info(loc).type.name != "NotFound"


def is_file(loc: Location) -> bool:
    if isinstance(loc, Path):
        return loc.is_file()
    return _info(loc).type.name == "File"


def is_dir(loc: Location) -> bool:
    """A directory; for a URI, a prefix that holds something."""
    if isinstance(loc, Path):
        return loc.is_dir()
    return _info(loc).type.name == "Directory"


def size(loc: Location) -> int | None:
    """Bytes in the file ``loc``; None when there is none."""
    if isinstance(loc, Path):
        try:
            return loc.stat().st_size
        except FileNotFoundError:
            return None
    info = _info(loc)
    return info.size if info.type.name == "File" else None


def _info(loc: Uri) -> pafs.FileInfo:
    fs, path = filesystem(loc)
    return fs.get_file_info(path)


def read_bytes(loc: Location) -> bytes:
    if isinstance(loc, Path):
        return loc.read_bytes()
    fs, path = filesystem(loc)
    with fs.open_input_stream(path) as fh:  # pyarrow raises FileNotFoundError for none
        return fh.read()


def read_text(loc: Location) -> str:
    return read_bytes(loc).decode()


def write_bytes(loc: Location, data: bytes) -> None:
    """Write ``loc`` whole; a reader sees the old file or the new one, never half of one (an
    object store's PUT is atomic; a local file is written beside it and renamed)."""
    if isinstance(loc, Uri):
        fs, path = filesystem(loc)
        with fs.open_output_stream(path) as fh:
            fh.write(data)
        return
    loc.parent.mkdir(parents=True, exist_ok=True)
    tmp = loc.with_name(f".{loc.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, loc)


def write_text(loc: Location, text: str) -> None:
    write_bytes(loc, text.encode())


def append_text(loc: Location, text: str) -> None:
    """Append to a small file (an object store has no append: the object is rewritten)."""
    if isinstance(loc, Path):
        loc.parent.mkdir(parents=True, exist_ok=True)
        with loc.open("a") as fh:
            fh.write(text)
        return
    old = read_bytes(loc) if exists(loc) else b""
    write_bytes(loc, old + text.encode())


def read_from(loc: Location, offset: int) -> tuple[int, bytes] | None:
    """``(size, bytes from offset)`` of a growing file; None when it does not exist."""
    if isinstance(loc, Path):
        try:
            with loc.open("rb") as fh:
                end = fh.seek(0, 2)
                fh.seek(min(offset, end))
                return end, fh.read()
        except OSError:
            return None
    try:
        data = read_bytes(loc)
    except (FileNotFoundError, StorageError):
        return None
    return len(data), data[offset:]


def open_input(loc: Location) -> pa.NativeFile:
    """A random-access handle (Parquet footers, seeks)."""
    fs, path = filesystem(loc)
    return fs.open_input_file(path)


def open_stream(loc: Location) -> Any:
    """A binary file object to read ``loc`` front to back."""
    if isinstance(loc, Path):
        return loc.open("rb")
    fs, path = filesystem(loc)
    return fs.open_input_stream(path)


def parquet_source(loc: Location) -> str | pa.NativeFile:
    """What ``pyarrow.parquet`` opens ``loc`` from: a local path as it is, else a handle."""
    return str(loc) if isinstance(loc, Path) else open_input(loc)


def remove(loc: Location) -> None:
    """Delete the file ``loc`` if there is one."""
    if isinstance(loc, Path):
        loc.unlink(missing_ok=True)
        return
    fs, path = filesystem(loc)
    with contextlib.suppress(FileNotFoundError):
        fs.delete_file(path)


def makedirs(loc: Location) -> None:
    """Make a local directory (a prefix on an object store needs nothing made)."""
    if isinstance(loc, Path):
        loc.mkdir(parents=True, exist_ok=True)


def files_under(loc: Location) -> Iterator[Location]:
    """Every file below the directory ``loc``, recursively (none when there is none)."""
    if isinstance(loc, Path):
        if loc.is_dir():
            yield from (p for p in loc.rglob("*") if p.is_file())
        return
    import pyarrow.fs as pafs

    fs, path = filesystem(loc)
    selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
    for info in fs.get_file_info(selector):
        if info.type == pafs.FileType.File:
            yield Uri(f"{loc.scheme}://{info.path}")


def glob(loc: Location, pattern: str) -> list[Location]:
    """Files below ``loc`` whose path relative to it matches ``pattern`` component by
    component (``checkpoint_*/checkpoint.pt``), sorted."""
    if isinstance(loc, Path):
        return sorted(loc.glob(pattern))
    parts = PurePosixPath(pattern).parts
    found = []
    for item in files_under(loc):
        relative = PurePosixPath(str(item)[len(str(loc)) + 1 :]).parts
        if len(relative) == len(parts) and all(map(fnmatch.fnmatchcase, relative, parts)):
            found.append(item)
    return sorted(found, key=str)


def rglob(loc: Location, name: str) -> list[Location]:
    """Files named ``name`` anywhere below ``loc``, sorted."""
    if isinstance(loc, Path):
        return sorted(loc.rglob(name))
    return sorted((f for f in files_under(loc) if f.name == name), key=str)


def upload(local: Path, loc: Location) -> None:
    """Copy the local file ``local`` to ``loc`` (streamed, not read into memory)."""
    if isinstance(loc, Path):
        loc.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, loc)
        return
    fs, path = filesystem(loc)
    with open(local, "rb") as src, fs.open_output_stream(path) as dst:
        shutil.copyfileobj(src, dst, length=1 << 22)


def upload_dir(local: Path, loc: Location) -> None:
    """Copy every file below the local directory ``local`` to the same places below ``loc``."""
    for file in (p for p in local.rglob("*") if p.is_file()):
        upload(file, join(loc, *file.relative_to(local).parts))


def join(loc: Location, *parts: str) -> Location:
    for part in parts:
        loc = loc / part
    return loc


def local_dir(loc: Location) -> Path:
    """A local directory for what only a local file can hold (Ray's log, TensorBoard's event
    files before upload): ``loc`` itself when it is local, else a folder under the system's
    temporary directory named after the URI."""
    if isinstance(loc, Path):
        return loc
    scratch = Path(tempfile.gettempdir()) / "matsci-ray" / loc.scheme / loc.key
    scratch.mkdir(parents=True, exist_ok=True)
    return scratch


__all__ = [
    "Location",
    "LocationField",
    "Uri",
    "absolute",
    "append_text",
    "check",
    "exists",
    "filesystem",
    "glob",
    "is_dir",
    "is_file",
    "is_remote",
    "join",
    "local_dir",
    "location",
    "open_input",
    "open_stream",
    "parquet_source",
    "ray_storage",
    "read_bytes",
    "read_from",
    "read_text",
    "remove",
    "resolve",
    "rglob",
    "size",
    "upload",
    "upload_dir",
    "uri_of",
    "write_bytes",
    "write_text",
]
