"""Object-store buckets as pyarrow file systems: S3 (and S3-compatible stores) and GCS, made
once per process, bucket and environment, and checked on first use with short timeouts, so
that an unreachable endpoint, missing or refused credentials or a missing bucket is one
:class:`~matsci_ray.errors.StorageError` line at once instead of the SDK's retries for tens
of seconds. Locations and file operations are :mod:`matsci_ray.storage`'s.
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

from matsci_ray.errors import StorageError

if TYPE_CHECKING:
    import pyarrow.fs as pafs

# Seconds the first check of a bucket waits to connect and for an answer: an endpoint that is
# down or firewalled fails within them instead of after the SDK's retries.
PROBE_CONNECT_S = 3.0
PROBE_REQUEST_S = 10.0
# AWS's instance-metadata address: credentials of an EC2 instance role come from it.
_IMDS = ("169.254.169.254", 80)
_CREDENTIAL_FILES = ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE")
_CREDENTIAL_VARS = (
    "AWS_PROFILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)
# The environment a file system is made from: a change makes a new one (tests, notebooks).
_ENV_KEYS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "GOOGLE_APPLICATION_CREDENTIALS",
    *_CREDENTIAL_FILES,
    *_CREDENTIAL_VARS,
)


def environment() -> tuple[str | None, ...]:
    return tuple(os.environ.get(key) for key in _ENV_KEYS)


def endpoint() -> str | None:
    """The S3 endpoint the environment names (``AWS_ENDPOINT_URL_S3`` first), if any: pyarrow
    reads neither variable itself in every release, so it is passed here, the one place."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _s3_options() -> dict[str, Any]:
    options: dict[str, Any] = {}
    url = endpoint()
    if url:
        scheme, sep, rest = url.partition("://")
        options["endpoint_override"] = rest if sep else url
        options["scheme"] = scheme if sep else "https"
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if region:
        options["region"] = region
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        options.update(access_key=key, secret_key=secret)
        if os.environ.get("AWS_SESSION_TOKEN"):
            options["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    return options


@functools.lru_cache(maxsize=16)
def s3_filesystem(bucket: str, env: tuple[str | None, ...]) -> pafs.FileSystem:
    """One checked S3 file system per bucket and environment (``env`` keys the cache only)."""
    import pyarrow.fs as pafs

    where = f"s3://{bucket}"
    _check_credentials(where)
    options = _s3_options()
    probe = pafs.S3FileSystem(
        **options,
        connect_timeout=PROBE_CONNECT_S,
        request_timeout=PROBE_REQUEST_S,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1),
    )
    _checked(probe, "s3", bucket, "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
    return pafs.S3FileSystem(**options)


@functools.lru_cache(maxsize=16)
def gcs_filesystem(bucket: str, env: tuple[str | None, ...]) -> pafs.FileSystem:
    """One checked GCS file system per bucket (Google's default credentials)."""
    import pyarrow.fs as pafs

    fs = pafs.GcsFileSystem()
    return _checked(fs, "gs", bucket, "GOOGLE_APPLICATION_CREDENTIALS")


def _check_credentials(where: str) -> None:
    """Some credential source is configured: without one the SDK would sign nothing and a
    private bucket answer 'access denied' (or a metadata lookup stall) far from the cause."""
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if bool(key) != bool(secret):
        given, missing = (
            ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
            if key
            else ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID")
        )
        raise StorageError(f"{where}: {given} is set but {missing} is not")
    if key or any(os.environ.get(v) for v in _CREDENTIAL_VARS):
        return
    files = [os.environ.get(v) for v in _CREDENTIAL_FILES]
    files += [str(Path.home() / ".aws" / "credentials"), str(Path.home() / ".aws" / "config")]
    metadata = os.environ.get("AWS_EC2_METADATA_DISABLED", "").lower() != "true"
    if any(f and Path(f).is_file() for f in files) or (metadata and _instance_role()):
        return
    raise StorageError(
        f"{where}: no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
        "(or AWS_PROFILE) in the environment of every Ray node"
    )


@functools.cache
def _instance_role() -> bool:
    """Whether an EC2 metadata service answers (instance-role credentials); a quick connect."""
    try:
        with socket.create_connection(_IMDS, timeout=0.3):
            return True
    except OSError:
        return False


def _checked(fs: pafs.FileSystem, scheme: str, bucket: str, credentials: str) -> pafs.FileSystem:
    """``fs`` once its bucket answers; else one line on why not."""
    import pyarrow.fs as pafs

    where = f"{scheme}://{bucket}"
    try:
        info = fs.get_file_info(bucket)
    except OSError as error:
        raise StorageError(f"{where}: {_why(error, credentials)}") from None
    if info.type == pafs.FileType.NotFound:
        raise StorageError(
            f"{where}: bucket {bucket!r} does not exist"
            + (f" at {endpoint()}" if scheme == "s3" and endpoint() else "")
            + " (create it first)"
        )
    return fs


def _why(error: OSError, credentials: str) -> str:
    text = str(error)
    upper = text.upper()
    if "NETWORK_CONNECTION" in upper or "CURLCODE" in upper or "TIMEOUT" in upper:
        at = endpoint() or "the default endpoint"
        return f"cannot reach the object store at {at} (check AWS_ENDPOINT_URL and the network)"
    if any(s in upper for s in ("ACCESS_DENIED", "ACCESSDENIED", "INVALID_ACCESS", "SIGNATURE")):
        return f"access denied: check the credentials ({credentials})"
    if "NO_SUCH_BUCKET" in upper:
        return "the bucket does not exist (create it first)"
    return first_line(error)


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
