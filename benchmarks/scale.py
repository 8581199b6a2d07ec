"""Scale benchmark: workers across nodes, elastic recovery, and an OC20-like corpus of up to
millions of frames streamed through ingest and graph building. Every figure is a ratio to a
baseline measured in the same run.

Run ``python benchmarks/scale.py`` (``--quick`` for a smoke run; ``--parts corpus`` and
``--frames 100000 1000000`` to pick). See benchmarks/README.md ("Scale") for what each figure
means and the last run's numbers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# Read by Ray when it starts; set before anything imports ray (its workers inherit them).
os.environ.update(
    RAY_DATA_USE_DATASOURCE_V2="0", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0"
)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.cluster, benchmarks.*

from benchmarks.scale_cluster import cluster_parts
from benchmarks.scale_corpus import bench_corpus
from benchmarks.train import ROOT

Row = dict[str, Any]


# ---------------------------------------------------------------- report


def markdown(result: Row) -> str:
    lines: list[str] = []
    if "workers" in result:
        lines += ["| workers (nodes) | samples/s | ÷ 1 worker |", "|--:|--:|--:|"]
        for n, run in result["workers"]["runs"].items():
            lines.append(f"| {n} | {run['samples_per_s']:.0f} | {run['ratio']:.2f} |")
        lines.append("")
    if "elastic" in result:
        e = result["elastic"]
        lines += [
            "| elastic | seconds | ÷ cold start |",
            "|---|--:|--:|",
            f"| cold start (launch → epoch 1) | {e['cold_start_s']:.1f} | 1.00 |",
            f"| node lost → first epoch on 1 worker | {e['loss_to_fewer_s']:.1f} "
            f"| {e['loss_to_fewer_vs_cold']:.2f} |",
            f"| node joined → first epoch on 2 | {e['arrival_to_full_s']:.1f} "
            f"| {e['arrival_to_full_vs_cold']:.2f} |",
            "",
        ]
    if "corpus" in result:
        lines += _corpus_markdown(result["corpus"])
    return "\n".join(lines)


def _corpus_markdown(c: Row) -> list[str]:
    b = c["bytes"]
    lines = [
        f"Bytes per frame, the same {b['frames']} frames: "
        f"Parquet {b['parquet_bytes_per_frame']:.0f}, "
        f".extxyz.xz {b['extxyz_xz_bytes_per_frame']:.0f} (ratio {b['parquet_vs_xz']:.2f})",
        "",
        "| frames | ingest frames/s | ÷ parse | Parquet B/frame | epoch frames "
        "| epoch frames/s | peak driver MiB private (shared) | peak tree MiB private "
        "(shared) | peak object store MiB | data wait (after the first batch) |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for target, row in c["sizes"].items():
        i, e = row.get("ingest"), row["epoch"]
        w = row.get("data_wait", {})
        wait = (
            f"{w['data_wait_fraction']:.3f} ({w['data_wait_after_first_batch']:.3f})" if w else "—"
        )
        ingest = (
            f"{i['frames_per_s']:.0f} | {i['vs_parse']:.2f} | {i['parquet_bytes_per_frame']:.0f}"
            if i
            else "— | — | —"  # a reused corpus: its ingest ran in an earlier run
        )
        lines.append(
            f"| {target} | {ingest} | {e['frames']} | {e['frames_per_s']:.0f} "
            f"| {e['driver_private_mib']:.0f} ({e['driver_shared_mib']:.0f}) "
            f"| {e['tree_private_mib']:.0f} ({e['tree_shared_mib']:.0f}) "
            f"| {e['object_store_mib']:.0f} | {wait} |"
        )
    flat = ", ".join(f"{k} {v:.2f}" for k, v in c.get("flatness", {}).items()) or "one size"
    largest = c["sizes"][max(c["sizes"])]["epoch"].get("second_half_vs_first", {})
    halves = ", ".join(f"{k} {v:.2f}" for k, v in largest.items())
    return [
        *lines,
        "",
        f"Largest ÷ smallest size: {flat}",
        f"Largest size, peak over the second half of its epoch ÷ the first half: {halves}",
        "",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--parts",
        nargs="+",
        default=["workers", "elastic", "corpus"],
        choices=["workers", "elastic", "corpus"],
    )
    parser.add_argument(
        "--frames",
        type=int,
        nargs="+",
        default=[100_000, 1_000_000],
        help="corpus sizes (rounded up to whole copies of the 4,207 frames)",
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--epochs", type=int, default=4, help="per workers run (1st: warm-up)")
    parser.add_argument("--elastic-epochs", type=int, default=8)
    parser.add_argument("--mp-copies", type=int, default=4, help="MP train split repeated")
    parser.add_argument(
        "--wait-steps", type=int, default=60, help="data wait: optimiser steps per epoch"
    )
    parser.add_argument(
        "--keep-corpus", type=Path, help="move the largest size's ingested corpus here"
    )
    parser.add_argument(
        "--reuse-corpus",
        type=Path,
        help="a --keep-corpus directory: the largest size streams from it, not generated again",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: small, few epochs")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/scale.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.frames, args.workers, args.epochs, args.mp_copies = [4207, 8414], [1, 2], 2, 1
        args.elastic_epochs, args.wait_steps = 6, 8
    import ray

    started = datetime.datetime.now(datetime.timezone.utc)
    load0 = os.getloadavg()[0]
    result: Row = {}
    with _temp() as tmp:
        if "corpus" in args.parts:
            result["corpus"] = bench_corpus(args, tmp)
        result |= cluster_parts(args, tmp)  # after the local Ray has stopped
    report = {
        "date": started.isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "ray": ray.__version__,
            "load_average_start_end": [load0, os.getloadavg()[0]],
        },
        "wall_s": (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(),
        **result,
    }
    table = markdown(result)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**report, "markdown": table}, indent=1, default=str))
    print(f"wrote {args.out}")


@contextmanager
def _temp() -> Iterator[Path]:
    """A short temp dir under /tmp (Ray's socket paths must stay short), removed at the end."""
    tmp = Path(tempfile.mkdtemp(prefix="mrs-", dir="/tmp"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
