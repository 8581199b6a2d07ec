"""``matsci-ray download``: fetch the full public data sets (resumable, checksum-verified)."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from matsci_ray.data.download import (
    CATALOGUE,
    DEFAULT_SPLITS,
    Archive,
    Checksum,
    DownloadError,
    fetch,
)
from matsci_ray.data.mp_api import DEFAULT_ENDPOINT, MPAPIError, download_summary, resolve_api_key

DATASETS = (*CATALOGUE, "materials-project", "url")
_EPILOG = "\n".join(
    [
        "splits:",
        *(
            f"  {name}: {', '.join(splits)} (default {DEFAULT_SPLITS[name]})"
            for name, splits in CATALOGUE.items()
        ),
        "",
        "An interrupted download resumes when the same command is run again. OC20 archives are",
        "verified against their published MD5s; LiPS and --url files need --sha256 (or --md5).",
        "materials-project reads the API key from MP_API_KEY or --api-key.",
    ]
)


class _UsageError(Exception):
    pass


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return value


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``download`` verb; its handler (``args.func``) returns an exit code."""
    parser = subparsers.add_parser(
        "download",
        help="download the full data sets (OC20, LiPS, Materials Project, any URL)",
        description="Download a full data set into --out: resumable, checksum-verified.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("dataset", choices=DATASETS, help="what to download")
    parser.add_argument("--out", type=Path, required=True, help="destination directory")
    parser.add_argument("--split", nargs="+", metavar="SPLIT", help="catalogue split(s)")
    parser.add_argument(
        "--base-url",
        "--endpoint",
        dest="base_url",
        metavar="URL",
        help="mirror serving the archives' file names (or the MP API endpoint, default "
        f"{DEFAULT_ENDPOINT})",
    )
    parser.add_argument("--url", help="with dataset 'url': the file to fetch")
    parser.add_argument("--filename", help="with --url: local file name (default: URL's last part)")
    digest = parser.add_mutually_exclusive_group()
    digest.add_argument("--sha256", metavar="HEX", help="expected SHA-256 (overrides catalogue)")
    digest.add_argument("--md5", metavar="HEX", help="expected MD5 (overrides catalogue)")
    parser.add_argument(
        "--extract",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="unpack tar/tar.gz/tar.xz/zip archives into --out (default: yes)",
    )
    parser.add_argument("--retries", type=int, default=5, help="retries per failure (default 5)")
    parser.add_argument("--api-key", help="Materials Project API key (default: $MP_API_KEY)")
    parser.add_argument("--page-size", type=_positive, default=500, help="MP documents per request")
    parser.add_argument("--max-docs", type=_positive, help="stop after this many MP documents")
    parser.set_defaults(func=run)


def _checksum(args: argparse.Namespace) -> Checksum | None:
    for algorithm, size in (("sha256", 64), ("md5", 32)):
        value = getattr(args, algorithm)
        if value is not None:
            if not re.fullmatch(rf"[0-9a-fA-F]{{{size}}}", value):
                raise _UsageError(f"--{algorithm} must be {size} hexadecimal digits")
            return Checksum(algorithm, value.lower())
    return None


def _archives(args: argparse.Namespace) -> list[Archive]:
    if args.dataset == "url":
        if not args.url:
            raise _UsageError("dataset 'url' needs --url")
        name = args.filename or PurePosixPath(urlparse(args.url).path).name
        if not name or name in (".", ".."):
            raise _UsageError(f"cannot derive a file name from {args.url}; pass --filename")
        return [Archive("url", "-", args.url, name, None)]
    known = CATALOGUE[args.dataset]
    splits = [split.lower() for split in args.split or [DEFAULT_SPLITS[args.dataset]]]
    for split in splits:
        if split not in known:
            raise _UsageError(
                f"unknown split {split!r} for {args.dataset}; known: {', '.join(known)}"
            )
    return [known[split] for split in splits]


def run(args: argparse.Namespace) -> int:
    """Handler of ``matsci-ray download``: 0 on success, 1 on a failed download, 2 on misuse."""
    try:
        if args.dataset == "materials-project":
            try:
                key = resolve_api_key(args.api_key)
            except MPAPIError as exc:
                raise _UsageError(str(exc)) from None
            count = download_summary(
                args.out,
                api_key=key,
                endpoint=args.base_url or DEFAULT_ENDPOINT,
                page_size=args.page_size,
                max_docs=args.max_docs,
                retries=args.retries,
            )
            print(f"materials-project: {count} summary documents in {args.out}")
            return 0
        checksum = _checksum(args)
        archives = _archives(args)
        if checksum is not None and len(archives) > 1:
            raise _UsageError("--sha256/--md5 apply to one file: give a single --split")
        for archive in archives:
            path = fetch(
                archive,
                args.out,
                base_url=None if args.dataset == "url" else args.base_url,
                checksum=checksum,
                extract=args.extract,
                retries=args.retries,
            )
            print(f"{archive.dataset} {archive.split}: {path}")
        return 0
    except _UsageError as exc:
        print(f"matsci-ray download: error: {exc}", file=sys.stderr)
        return 2
    except (DownloadError, MPAPIError) as exc:
        print(f"matsci-ray download: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("matsci-ray download: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
