"""``matsci-ray report DIR... --out OUT``: result tables (Markdown, CSV) and an HTML report."""

from __future__ import annotations

import argparse
from pathlib import Path

from matsci_ray.storage import location


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report",
        help="tables, learning curves and parity plots of finished runs",
        description=(
            "Gather finished trials (trials.jsonl files found under each DIR, and run "
            "directories with a history.jsonl) into the MatSciML paper's Tables 3-5, written "
            "as OUT/leaderboard.md, one CSV per table and a self-contained OUT/report.html."
        ),
    )
    p.add_argument(
        "dirs",
        nargs="+",
        type=location,
        metavar="DIR",
        help="Tune experiment, run directory or storage root, a path or URI (searched recursively)",
    )
    p.add_argument("--out", type=Path, required=True, help="directory for the report files")
    p.add_argument(
        "--no-plots",
        action="store_true",
        help="tables only: no learning curves, parity plots or confusion matrices",
    )
    p.add_argument(
        "--data-root",
        type=location,
        help="ingest output for parity plots (default: each checkpoint's config)",
    )
    p.add_argument(
        "--max-structures",
        type=int,
        default=500,
        help="validation structures scored per data set for parity plots (500)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from matsci_ray.cli.main import UserError
    from matsci_ray.report import load_trials
    from matsci_ray.report.html import write_html
    from matsci_ray.report.tables import build_tables, write_tables

    trials = load_trials(args.dirs)
    if not trials:
        raise UserError(f"no trials.jsonl or history.jsonl under {', '.join(map(str, args.dirs))}")
    tables = build_tables(trials)
    written = write_tables(trials, args.out, tables)
    written["html"] = write_html(
        trials,
        args.out,
        tables=tables,
        plots=not args.no_plots,
        data_root=args.data_root,
        max_structures=args.max_structures,
    )
    for path in written.values():
        print(path)
    return 0
