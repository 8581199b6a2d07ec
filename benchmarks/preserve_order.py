"""What ``data.preserve_order`` (blocks in plan order, the default) costs where the order is
made every epoch: EGNN on MP formation energy with its graphs built in the stream
(``data.cache_graphs: never``), the training split repeated 4 times, 2 workers x 0.5 CPU;
Ray Train samples/s and data wait with ``true`` against ``false`` (Ray's own default), runs of
the two alternated so that load from elsewhere hits both.

Run ``python benchmarks/preserve_order.py`` (~5 minutes on 2 cores; ``--repeats`` pairs of
runs). Writes ``benchmarks/results/preserve_order.json`` and prints a Markdown table. See
benchmarks/README.md, "Blocks in plan order".
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train import ROOT, fit, ingest, make_config, replicate, start_ray


def measure(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    data = tmp / "data"
    ingest(data, quick=False)
    mp = replicate(data, "materials-project", args.copies, tmp / "mp-rep")
    runs: dict[str, list[dict[str, Any]]] = {"false": [], "true": []}
    for _ in range(args.repeats):
        for preserve in (False, True):  # alternated: the machine's load hits both alike
            config = make_config(
                mp, tmp, "mp-formation-energy", "egnn",
                data={"preserve_order": preserve, "cache_graphs": "never"},
                optim={"epochs": args.epochs},
            )  # fmt: skip
            runs[str(preserve).lower()].append(fit(config))
    rate = {k: [r["samples_per_s"] for r in v] for k, v in runs.items()}
    wait = {k: [r["data_wait_fraction"] for r in v] for k, v in runs.items()}
    ratios = [x / y for x, y in zip(rate["true"], rate["false"], strict=True)]
    return {
        "samples_per_s": rate,
        "data_wait_fraction": wait,
        "ratio_per_pair": ratios,
        "ratio": statistics.median(ratios),
    }


def markdown(row: dict[str, Any]) -> str:
    rate, wait = row["samples_per_s"], row["data_wait_fraction"]
    pairs = ", ".join(f"{x:.3f}" for x in row["ratio_per_pair"])
    return "\n".join(
        [
            "| samples/s, false | samples/s, true | ratio (pairs) | data wait false → true |",
            "|--:|--:|--:|--:|",
            f"| {statistics.median(rate['false']):.1f} | {statistics.median(rate['true']):.1f} "
            f"| **{row['ratio']:.3f}** ({pairs}) | {statistics.median(wait['false']):.3f} → "
            f"{statistics.median(wait['true']):.3f} |",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2, help="pairs of runs")
    parser.add_argument("--epochs", type=int, default=4, help="per run; the first is warm-up")
    parser.add_argument("--copies", type=int, default=4, help="MP train split repeated")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/preserve_order.json")
    args = parser.parse_args(argv)
    started, load = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="por", dir="/tmp") as directory:
        tmp = Path(directory)
        start_ray(tmp)
        row = measure(args, tmp)
    record = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "command": "python benchmarks/preserve_order.py " + " ".join(argv or sys.argv[1:]),
        "load_at_start": load,
        "result": row,
        "wall_s": time.perf_counter() - started,
        "load_at_end": os.getloadavg()[0],
    }
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(markdown(row))


if __name__ == "__main__":
    main()
