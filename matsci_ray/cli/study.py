"""``matsci-ray study CONFIG``: a family of experiments (Tables 3–5) or a sweep on Ray Tune."""

from __future__ import annotations

import argparse
from pathlib import Path


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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from matsci_ray.cli.main import UserError
    from matsci_ray.config import load_study
    from matsci_ray.experiments.study import run_study
    from matsci_ray.ray_env import init_ray

    study = load_study(args.config)
    if args.family and study.family != args.family:
        raise UserError(f"{args.config}: family is {study.family!r}, expected {args.family!r}")
    init_ray(args.address, num_cpus=args.num_cpus)
    trials = run_study(study)
    print(f"trials: {trials}")
    from matsci_ray.report import load_trials
    from matsci_ray.report.tables import write_tables

    for name, path in write_tables(load_trials([trials.parent]), trials.parent / "report").items():
        print(f"{name}: {path}")
    return 0
