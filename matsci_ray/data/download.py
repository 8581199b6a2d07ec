"""Resumable, checksum-verified downloads of the public data sets, and safe archive extraction.

The full data sets are large (OC20 S2EF "all" is 225 GB), so a download must survive dropped
connections and restarts: bytes stream into ``<dest>.part``, a rerun resumes it with an HTTP
``Range`` request, and the file only gets its final name after its checksum matches. A file at
its final name is therefore always complete, which is what lets a rerun skip it.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tarfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import requests
from tqdm import tqdm

_CHUNK = 1 << 20  # for hashing files on disk
# Network reads are smaller: an interrupted read loses its whole in-flight chunk.
_NET_CHUNK = 1 << 16
_RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_TRANSIENT = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)


class DownloadError(RuntimeError):
    """A download or extraction failed; the message is one line naming the URL or file."""


@dataclass(frozen=True)
class Checksum:
    """An expected digest; ``alternatives`` exist because some publishers list conflicting ones."""

    algorithm: str  # "sha256" or "md5" (OC20 only publishes MD5s)
    hexdigest: str
    alternatives: tuple[str, ...] = ()

    def matches(self, digest: str) -> bool:
        return digest.lower() in {self.hexdigest.lower(), *(d.lower() for d in self.alternatives)}


@dataclass(frozen=True)
class Archive:
    """One published file. ``url`` is canonical; a mirror serves ``filename`` flat."""

    dataset: str
    split: str
    url: str
    filename: str
    checksum: Checksum | None

    def resolve_url(self, base_url: str | None = None) -> str:
        return f"{base_url.rstrip('/')}/{self.filename}" if base_url else self.url


_OC20 = "https://dl.fbaipublicfiles.com/opencatalystproject/data"
# URLs and MD5s from the Open Catalyst Project's DATASET.md (FAIR-Chem/fairchem). Two revisions
# of that page swap the MD5s of the 2M and 20M train archives, so both values are accepted for
# those two: either still detects a corrupt or truncated download.
_MD5_2M, _MD5_20M = "863bc983245ffc0285305a1850e19cf7", "953474cb93f0b08cdc523399f03f7c36"
_OC20_FILES: dict[str, dict[str, tuple[str, ...]]] = {
    "oc20-s2ef": {  # split: (file name, md5, accepted alternative md5s...)
        "200k": ("s2ef_train_200K.tar", "f8d0909c2623a393148435dede7d3a46"),
        "2m": ("s2ef_train_2M.tar", _MD5_2M, _MD5_20M),
        "20m": ("s2ef_train_20M.tar", _MD5_20M, _MD5_2M),
        "all": ("s2ef_train_all.tar", "12a7087bfd189a06ccbec9bc7add2bcd"),
        "val_id": ("s2ef_val_id.tar", "f57f7f5c1302637940f2cc858e789410"),
        "val_ood_ads": ("s2ef_val_ood_ads.tar", "431ab0d7557a4639605ba8b67793f053"),
        "val_ood_cat": ("s2ef_val_ood_cat.tar", "532d6cd1fe541a0ddb0aa0f99962b7db"),
        "val_ood_both": ("s2ef_val_ood_both.tar", "5731862978d80502bbf7017d68c2c729"),
    },
    # One archive holds the train, val and test LMDBs of IS2RE/IS2RS.
    "oc20-is2re": {
        "all": ("is2res_train_val_test_lmdbs.tar.gz", "cfc04dd2f87b4102ab2f607240d25fb1")
    },
}
CATALOGUE: dict[str, dict[str, Archive]] = {
    dataset: {
        split: Archive(dataset, split, f"{_OC20}/{name}", name, Checksum("md5", md5, tuple(alt)))
        for split, (name, md5, *alt) in splits.items()
    }
    for dataset, splits in _OC20_FILES.items()
}
# The original LiPS release is Materials Cloud record 2022.45 (record_id 1302), as the MatSciML
# LiPS README cites; this file URL is the one third-party loaders use. TO BE CONFIRMED: Materials
# Cloud has since moved its archive, and no checksum is published beside the file, so
# verification needs --sha256.
_LIPS_URL = "https://archive.materialscloud.org/record/file?record_id=1302&filename=lips.xyz"
CATALOGUE["lips"] = {"all": Archive("lips", "all", _LIPS_URL, "lips.xyz", None)}
# MPtrj: figshare article 23713842 (Deng et al., CHGNet), file 41619375. Figshare shows no
# checksum beside the file and none is published elsewhere that we found, so, as for LiPS,
# verification needs --sha256 (a first download prints the digest to pin).
_MPTRJ_URL = "https://figshare.com/ndownloader/files/41619375"
CATALOGUE["mptrj"] = {"all": Archive("mptrj", "all", _MPTRJ_URL, "MPtrj_2022.9_full.json", None)}
DEFAULT_SPLITS = {"oc20-s2ef": "200k", "oc20-is2re": "all", "lips": "all", "mptrj": "all"}


def file_digest(path: Path, algorithm: str) -> str:
    hasher = hashlib.new(algorithm)
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


def download_file(
    url: str,
    dest: Path,
    checksum: Checksum | None = None,
    *,
    retries: int = 5,
    backoff: float = 2.0,
    timeout: float = 60.0,
    progress: bool | None = None,
    session: requests.Session | None = None,
) -> Path:
    """Download ``url`` to ``dest``, resuming ``dest.part`` and verifying ``checksum``.

    ``retries`` counts consecutive attempts that received nothing (0 disables retrying); an
    attempt that received bytes resets the count, so a flaky link can still finish 225 GB.
    """
    dest = Path(dest)
    if dest.exists() and (
        checksum is None or checksum.matches(file_digest(dest, checksum.algorithm))
    ):
        return dest  # only complete, verified files ever get the final name
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    # Without a published checksum we still hash, so the user can record the SHA-256.
    state = _Stream(checksum.algorithm if checksum else "sha256")
    http = session or requests.Session()
    show = sys.stderr.isatty() if progress is None else progress
    failures = 0
    while True:
        state.received = 0
        try:
            if _attempt(http, url, part, timeout, show, state):
                break
            reason = "connection closed before the end of the file"
        except _TRANSIENT as exc:
            reason = _one_line(exc)
        except _RetryableStatus as exc:
            reason = str(exc)
        failures = 0 if state.received else failures + 1
        if retries <= 0 or failures > retries:
            raise DownloadError(f"download of {url} failed ({reason}); rerun to resume")
        time.sleep(min(backoff * 2 ** max(failures - 1, 0), 60.0))
    digest = state.digest(part)
    if checksum is not None and not checksum.matches(digest):
        part.unlink()
        raise DownloadError(
            f"checksum mismatch for {dest.name} from {url}: expected {checksum.algorithm} "
            f"{checksum.hexdigest}, got {digest}; the partial file was removed"
        )
    if checksum is None:
        print(f"{dest.name}: not verified (no checksum given); sha256 {digest}", file=sys.stderr)
    os.replace(part, dest)  # atomic on one filesystem: readers never see a half file
    return dest


class _RetryableStatus(Exception):
    pass


@dataclass
class _Stream:
    """Hashes bytes as they are written, so a finished download needs no second full read."""

    algorithm: str
    hashed: int = 0
    received: int = 0  # bytes received in the current attempt

    def __post_init__(self) -> None:
        self.hasher = hashlib.new(self.algorithm)

    def sync(self, part: Path, offset: int) -> None:
        """Make the running hash cover exactly ``part[:offset]`` (rehashing only on resume)."""
        if self.hashed == offset:
            return
        self.hasher, self.hashed = hashlib.new(self.algorithm), 0
        if offset:
            with part.open("rb") as fh:
                while self.hashed < offset and (
                    chunk := fh.read(min(_CHUNK, offset - self.hashed))
                ):
                    self.update(chunk)

    def update(self, chunk: bytes) -> None:
        self.hasher.update(chunk)
        self.hashed += len(chunk)

    def digest(self, part: Path) -> str:
        self.sync(part, part.stat().st_size)
        return self.hasher.hexdigest()


def _one_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _attempt(
    http: requests.Session, url: str, part: Path, timeout: float, show: bool, state: _Stream
) -> bool:
    """One GET into ``part``; True when the file is complete. Restarts count as no progress."""
    offset = part.stat().st_size if part.exists() else 0
    # identity: a transparently re-encoded body would not match the ranges or the checksum.
    headers = {"Accept-Encoding": "identity"} | ({"Range": f"bytes={offset}-"} if offset else {})
    with http.get(url, headers=headers, stream=True, timeout=timeout) as resp:
        code, content_range = resp.status_code, resp.headers.get("Content-Range", "")
        if code == 416 and offset:
            # The part may already hold every byte: let the checksum decide when the size
            # matches, else start again from nothing.
            if content_range.rpartition("/")[2] == str(offset):
                return True
            part.unlink()
            return False
        if code in _RETRY_STATUS:
            raise _RetryableStatus(f"HTTP {code}")
        if code not in (200, 206):
            raise DownloadError(f"HTTP {code} {resp.reason} for {url}")
        if code == 206 and not content_range.startswith(f"bytes {offset}-"):
            part.unlink(missing_ok=True)  # a range we did not ask for: restart cleanly
            return False
        if code == 200:
            offset = 0  # the server ignored Range and sent the whole file: overwrite the part
        state.sync(part, offset)
        length = resp.headers.get("Content-Length")
        expected = offset + int(length) if length and length.isdigit() else None
        bar = tqdm(total=expected, initial=offset, unit="B", unit_scale=True, disable=not show)
        with part.open("ab" if offset else "wb") as fh, bar:
            bar.set_description(part.name.removesuffix(".part"))
            for chunk in resp.iter_content(_NET_CHUNK):
                fh.write(chunk)
                state.update(chunk)
                state.received += len(chunk)
                bar.update(len(chunk))
    # Without Content-Length, a clean end of stream is the only completeness signal we get.
    return expected is None or offset + state.received >= expected


# --- extraction -------------------------------------------------------------------------------

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".zip")


def is_archive(path: Path) -> bool:
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _inside(root: Path, name: str) -> bool:
    # Absolute and drive-qualified names are refused outright rather than re-rooted.
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).anchor:
        return False
    return (root / name).resolve().is_relative_to(root)


def extract_archive(archive: Path, dest_dir: Path) -> Path:
    """Extract a tar/tar.gz/tar.xz/zip into ``dest_dir``, refusing members that escape it.

    Members are checked one by one while streaming, so a multi-hundred-GB tar is read once.
    A marker file records a finished extraction so reruns skip it.
    """
    archive, dest_dir = Path(archive), Path(dest_dir)
    marker = dest_dir / f".{archive.name}.extracted"
    stamp = str(archive.stat().st_size)
    if marker.exists() and marker.read_text() == stamp:
        return dest_dir
    dest_dir.mkdir(parents=True, exist_ok=True)
    root = dest_dir.resolve()
    try:
        if archive.name.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    if not _inside(root, info.filename):
                        raise _refused(archive, info.filename, f"escapes {root}")
                    zf.extract(info, root)
        else:
            with tarfile.open(archive, "r:*") as tf:
                for member in tf:
                    _check_tar_member(archive, root, member)
                    if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4: defence in depth
                        tf.extract(member, root, filter="data")
                    else:
                        tf.extract(member, root)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
        raise DownloadError(f"cannot extract {archive}: {_one_line(exc)}") from exc
    marker.write_text(stamp)
    return dest_dir


def _refused(archive: Path, name: str, why: str) -> DownloadError:
    return DownloadError(f"refusing to extract {archive.name}: member {name!r} {why}")


def _check_tar_member(archive: Path, root: Path, member: tarfile.TarInfo) -> None:
    if not _inside(root, member.name):
        raise _refused(archive, member.name, f"escapes {root}")
    if member.issym():
        target = str(PurePosixPath(member.name).parent / member.linkname)
        if PurePosixPath(member.linkname).is_absolute() or not _inside(root, target):
            raise _refused(archive, member.name, f"links outside {root}")
    elif member.islnk():
        if not _inside(root, member.linkname):
            raise _refused(archive, member.name, f"links outside {root}")
    elif not (member.isfile() or member.isdir()):
        raise _refused(archive, member.name, "is a device or FIFO")


def fetch(
    archive: Archive,
    out_dir: Path,
    *,
    base_url: str | None = None,
    checksum: Checksum | None = None,
    extract: bool = True,
    retries: int = 5,
    backoff: float = 2.0,
    progress: bool | None = None,
) -> Path:
    """Download one catalogue entry into ``out_dir`` (and extract it); an explicit checksum wins."""
    path = download_file(
        archive.resolve_url(base_url),
        Path(out_dir) / archive.filename,
        checksum or archive.checksum,
        retries=retries,
        backoff=backoff,
        progress=progress,
    )
    if extract and is_archive(path):
        extract_archive(path, Path(out_dir))
    return path
