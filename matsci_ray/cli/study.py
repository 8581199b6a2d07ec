"""``matsci-ray study CONFIG``: a family of experiments (Tables 3–5) or a sweep on Ray Tune."""

from __future__ import annotations

import argparse
from pathlib import Path

from matsci_ray.cli.main import add_verbose


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "study",
        help="run an experiment family or an Optuna sweep on Ray Tune",
        description="Run a study YAML (family: single-task | task-pair | dataset-pair | sweep) "
        "as a Ray Tune experiment, each trial a Ray Train run; an interrupted study "
        "resumes. Writes trials.jsonl and the leaderboard.",
    )
    p.add_argument("config", type=Path, help="study YAML")
    p.add_argument("--family", help="refuse a config of any other family")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--num-cpus", type=int, help="CPUs for a local Ray (default: all)")
    add_verbose(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from matsci_ray.cli.main import UserError
    from matsci_ray.config import load_study
    from matsci_ray.console.ray_logs import RAY_LOG, ray_console
    from matsci_ray.experiments.study import run_study
    from matsci_ray.storage import local_dir

    study = load_study(args.config)
    if args.family and study.family != args.family:
        raise UserError(f"{args.config}: family is {study.family!r}, expected {args.family!r}")
    log_file = local_dir(study.base.run.storage / study.name) / RAY_LOG
    with ray_console(args.address, args.num_cpus, log_file, args.verbose):
        trials = run_study(study, verbose=args.verbose)
    print(f"trials: {trials}")
    from matsci_ray.report import load_trials
    from matsci_ray.report.tables import write_tables

    report = local_dir(trials.parent) / "report"  # tables are local files
    for name, path in write_tables(load_trials([trials.parent]), report).items():
        print(f"{name}: {path}")
    return 0
