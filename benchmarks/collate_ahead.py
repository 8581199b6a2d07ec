"""Collating the next batches in a background thread (``data.collate_ahead: 2``, the default)
against collating each between two steps in the training thread (``0``): Ray Train samples/s
and data wait of one worker, the two settings alternated so that load from elsewhere hits both.

Cases: EGNN on MP formation energy (5-atom cells, batch 32: collation is a large share of a
step) and MACE on LiPS forces (83-atom frames, batch 4: a long step). One worker with 1 CPU and
one torch thread, so the machine's second core is free for the collating thread, as a GPU
worker's host cores are.

Run ``python benchmarks/collate_ahead.py`` (~10 minutes on 2 cores; ``--repeats`` pairs of
runs per case). Writes ``benchmarks/results/collate_ahead.json`` and prints a Markdown table.
See benchmarks/README.md, "Collating ahead".
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

MACE = {"num_channels": 16, "max_ell": 2, "max_L": 0, "correlation": 2, "radial_mlp_dim": 32}
ONE_WORKER = {"num_workers": 1, "cpus_per_worker": 1.0, "threads_per_worker": 1}


def cases(data: Path, mp: Path, tmp: Path, epochs: int) -> dict[str, Any]:
    """Each case's config maker: ``collate_ahead`` -> config."""

    def egnn(ahead: int) -> Any:
        return make_config(
            mp, tmp, "mp-formation-energy", "egnn",
            data={"collate_ahead": ahead}, optim={"epochs": epochs}, run=ONE_WORKER,
        )  # fmt: skip

    def mace(ahead: int) -> Any:
        config = make_config(
            data, tmp, "lips-forces", "mace",
            data={"collate_ahead": ahead, "batch_size": 4, "cutoff": 5.0,
                  "max_train_samples": 256},
            optim={"epochs": epochs}, run=ONE_WORKER,
        )  # fmt: skip
        return config.model_copy(
            update={"model": config.model.model_copy(update={"params": MACE, "head_hidden": 16})}
        )

    return {
        "egnn": ("egnn, MP formation, batch 32", egnn),
        "mace": ("mace, LiPS forces, batch 4", mace),
    }


def measure(args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    data = tmp / "data"
    ingest(data, quick=False)
    mp = replicate(data, "materials-project", 4, tmp / "mp-rep")
    rows = []
    for key, (case, config_of) in cases(data, mp, tmp, args.epochs).items():
        if key not in args.cases:
            continue
        runs: dict[int, list[dict[str, Any]]] = {0: [], 2: []}
        for _ in range(args.repeats):
            for ahead in (0, 2):  # alternated: the machine's load hits both alike
                runs[ahead].append(fit(config_of(ahead)))
        rate = {a: [r["samples_per_s"] for r in rs] for a, rs in runs.items()}
        wait = {a: [r["data_wait_fraction"] for r in rs] for a, rs in runs.items()}
        ratios = [x / y for x, y in zip(rate[2], rate[0], strict=True)]
        row = {
            "case": case,
            "samples_per_s": rate,
            "data_wait_fraction": wait,
            "ratio_per_pair": ratios,
            "ratio": statistics.median(ratios),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| case | samples/s, ahead 0 | samples/s, ahead 2 | ratio (pairs) | data wait 0 → 2 |",
        "|---|--:|--:|--:|--:|",
    ]
    for r in rows:
        rate, wait = r["samples_per_s"], r["data_wait_fraction"]
        pairs = ", ".join(f"{x:.3f}" for x in r["ratio_per_pair"])
        lines.append(
            f"| {r['case']} | {statistics.median(rate['0']):.1f} | "
            f"{statistics.median(rate['2']):.1f} | **{r['ratio']:.3f}** ({pairs}) | "
            f"{statistics.median(wait['0']):.3f} → {statistics.median(wait['2']):.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=["egnn", "mace"], default=["egnn", "mace"])
    parser.add_argument("--repeats", type=int, default=2, help="pairs of runs per case")
    parser.add_argument("--epochs", type=int, default=4, help="per run; the first is warm-up")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/collate_ahead.json")
    args = parser.parse_args(argv)
    started, load = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="cah", dir="/tmp") as directory:
        tmp = Path(directory)
        start_ray(tmp)
        rows = measure(args, tmp)
    # JSON keys are strings: the table reads them back the same way
    rows = json.loads(json.dumps(rows))
    record = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "command": "python benchmarks/collate_ahead.py " + " ".join(argv or sys.argv[1:]),
        "load_at_start": load,
        "rows": rows,
        "wall_s": time.perf_counter() - started,
        "load_at_end": os.getloadavg()[0],
    }
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
