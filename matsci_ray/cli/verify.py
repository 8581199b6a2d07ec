"""``matsci-ray verify DIR``: check every shard of an ingest output against its manifest.

Exit status 0 when every shard is what ingest wrote, 1 when any is not (each bad file named on
its own line), 2 when DIR holds no manifest to check against (one-line error, as every verb).
"""

from __future__ import annotations

import argparse
import json

from matsci_ray.errors import UserError, one_line
from matsci_ray.storage import location

BAD = 1  # like cmp(1) and sha256sum -c: 1 is "differs", 2 is "could not check"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "verify",
        help="check every shard's size, rows and SHA-256 against the manifest",
        description=(
            "Check the shards of every data set under DIR (an ingest output whose "
            "manifest.json indexes its data sets, or one data set's directory) against their "
            "manifests: present, size, row count and SHA-256, hashed in blocks. Prints one "
            "line per bad file and a summary; exit 0 if all are good, 1 if any is bad."
        ),
    )
    p.add_argument(
        "directory", type=location, metavar="DIR", help="ingest output or data set (path or URI)"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="sizes and row counts only (what train and evaluate check on opening a split)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from matsci_ray.data.integrity import verify_dataset
    from matsci_ray.data.manifest import MANIFEST, datasets_under, read_manifest

    found = datasets_under(args.directory)
    if not found:
        raise UserError(
            f"{args.directory}: no {MANIFEST} of an ingest output or a data set here "
            "(the directory `matsci-ray ingest --out` wrote, or one data set inside it)"
        )
    shards = bad = 0
    damaged: list[str] = []
    for root, dataset in found:
        try:
            manifest = read_manifest(root, dataset)
        except json.JSONDecodeError as error:
            print(f"{root / dataset / MANIFEST}: unreadable manifest ({error})")
            damaged.append(dataset)
            continue
        except (OSError, ValueError) as error:  # messages name the file
            print(one_line(error))
            damaged.append(dataset)
            continue
        for path, problems in verify_dataset(root / dataset, manifest, quick=args.quick):
            shards += 1
            if problems:
                bad += 1
                print(f"{path}: {'; '.join(problems)}")
                if dataset not in damaged:
                    damaged.append(dataset)
    checked = "sizes and rows" if args.quick else "sizes, rows and SHA-256"
    if not damaged:
        sets = f"{len(found)} data set" + ("s" if len(found) != 1 else "")
        print(f"ok: {shards} shards in {sets} match their manifests ({checked})")
        return 0
    print(f"bad: {bad} of {shards} shards ({checked}) in {', '.join(damaged)}; re-ingest to repair")
    return BAD
