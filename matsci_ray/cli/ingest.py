"""``matsci-ray ingest SOURCE PATH... --out DIR``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from matsci_ray.data.readers import GENERIC, READERS, reader_class
from matsci_ray.keys import TARGETS
from matsci_ray.storage import check, location


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "ingest",
        help="read a source into validated, sharded Parquet",
        description=(
            "Read SOURCE files (or directories of them) into Parquet shards per data set and "
            "split, plus manifest.json with counts, rejects and target statistics. Re-running "
            "resumes: finished work units are skipped. Sample ids name each file by its path "
            "under the directory given (a file given alone by its name), so they are unique "
            "within a data set; an empty input file is an error."
        ),
    )
    p.add_argument("source", choices=sorted(READERS), help="which source reader to use")
    p.add_argument("paths", nargs="+", type=Path, help="input files or directories")
    p.add_argument(
        "--out", type=location, required=True, help="output directory or URI (s3://bucket/prefix)"
    )
    p.add_argument(
        "--target",
        action="append",
        default=[],
        metavar="NAME=KEY",
        help=(
            f"canonical target NAME ({', '.join(TARGETS)}) from KEY: an ASE key (generic, "
            "omat24) or a CSV column (carbon-24, perov-5, mp-20, replacing their defaults)"
        ),
    )
    p.add_argument("--dataset", help="generic source: data set name (default: generic)")
    p.add_argument(
        "--id-split",
        type=Path,
        help="directory of {train,val,test}.yml id lists (the MatSciML paper's MP split)",
    )
    p.add_argument(
        "--split",
        default="0.8,0.1,0.1",
        help="train,val,test fractions for records without an id split (default 0.8,0.1,0.1)",
    )
    p.add_argument("--seed", type=int, default=42, help="split seed (default 42)")
    p.add_argument("--strict", action="store_true", help="fail on the first rejected record")
    p.add_argument("--chunk-size", type=int, help="records per work unit (default: per reader)")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--num-cpus", type=int, help="CPUs for a local Ray (default: all)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def reader_options(args: argparse.Namespace) -> dict[str, Any]:
    from matsci_ray.cli.main import UserError

    options: dict[str, Any] = {}
    if args.source == GENERIC and not args.target:
        raise UserError("the generic source needs at least one --target NAME=KEY")
    if args.target:
        if args.source != GENERIC and not getattr(
            reader_class(args.source), "target_option", False
        ):
            raise UserError(f"--target does not apply to the {args.source} source")
        options["targets"] = _parse_targets(args.target)
    if args.dataset:
        if args.source != GENERIC:
            raise UserError("--dataset applies to the generic source only")
        options["dataset"] = args.dataset
    if args.chunk_size:
        options["chunk_size"] = args.chunk_size
    return options


def _parse_targets(items: list[str]) -> dict[str, str]:
    from matsci_ray.cli.main import UserError

    targets = {}
    for item in items:
        name, sep, key = item.partition("=")
        if not sep or not name or not key:
            raise UserError(f"--target {item!r}: expected NAME=KEY")
        targets[name] = key
    return targets


def run(args: argparse.Namespace) -> int:
    from matsci_ray.cli.main import UserError
    from matsci_ray.data.ingest import run_ingest
    from matsci_ray.data.shards import IngestOptions
    from matsci_ray.data.splits import SplitConfig
    from matsci_ray.ray_env import init_ray

    try:
        fractions = tuple(float(x) for x in args.split.split(","))
        split = SplitConfig(fractions=fractions, seed=args.seed)  # type: ignore[arg-type]
    except ValueError as error:
        raise UserError(f"--split {args.split!r}: {error}") from None
    options = IngestOptions(
        source=args.source,
        reader_options=reader_options(args),
        split=split,
        strict=args.strict,
        id_split_name=str(args.id_split) if args.id_split else None,
    )
    check(args.out)  # before Ray starts: a bad bucket or endpoint is one line at once
    init_ray(args.address, num_cpus=args.num_cpus)
    manifest = run_ingest(
        args.source,
        args.paths,
        args.out,
        options,
        id_split_dir=args.id_split,
        progress=not args.no_progress,
    )
    counts = manifest["counts"]
    print(f"{manifest['dataset']}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if manifest["rejects"]["by_reason"]:
        print("rejected by reason: " + json.dumps(manifest["rejects"]["by_reason"]))
    print(f"manifest: {args.out / manifest['dataset'] / 'manifest.json'}")
    return 0
