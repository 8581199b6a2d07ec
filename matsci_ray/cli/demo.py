"""``matsci-ray demo``: the whole pipeline on the shared samples, on a local Ray.

Ingests every sample source; trains MP formation energy (evaluated on the test split); runs a
multi-task pair (additive and PCGrad), a multi-data pair and a 2-trial Optuna sweep on Ray
Tune; writes the leaderboard; prints where to look (dashboard, TensorBoard, report).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

# (source, paths relative to the samples directory)
SAMPLE_SOURCES: list[tuple[str, list[str]]] = [
    ("oc20-s2ef", ["oc20/trajectories"]),
    ("oc20-is2re", ["oc20/trajectories"]),
    # the devset LMDB holds the same 200 documents: ingesting both would count each twice
    ("materials-project", ["materials_project/summary_docs.jsonl"]),
    ("lips", ["lips/lips_devset.extxyz"]),
    ("oqmd", ["matsciml-devsets/oqmd/data.lmdb"]),
    ("nomad", ["matsciml-devsets/nomad/data.lmdb"]),
    ("carolina-db", ["matsciml-devsets/carolina_db/data.lmdb"]),
]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="ingest the samples, run every experiment family, write the leaderboard",
        description="End to end on the shared samples, on a local Ray: every source ingested; "
        "a single-task run (evaluated on test), a multi-task pair (additive and PCGrad), a "
        "multi-data pair and a 2-trial Optuna sweep on Ray Tune; then the leaderboard.",
    )
    p.add_argument(
        "--samples",
        type=Path,
        default=Path("../shared/datasets"),
        help="the sample data sets (default ../shared/datasets)",
    )
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory")
    p.add_argument("--epochs", type=int, default=20, help="epochs of the single-task run")
    p.add_argument("--study-epochs", type=int, default=5, help="epochs of each study trial")
    p.add_argument("--model", default="egnn", choices=["egnn", "megnet", "gala"])
    p.add_argument("--num-cpus", type=int, help="CPUs for the local Ray (default: all)")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    p.set_defaults(func=run)


def _experiment(args: argparse.Namespace, data: Path, storage: Path, **fields: Any) -> dict:
    return {
        "name": f"demo-mp-formation-{args.model}",
        "tasks": ["mp-formation-energy"],
        "data": {"root": str(data), "cutoff": 6.0, "batch_size": 32},
        "model": {"name": args.model},
        "optim": {"lr": 1e-3, "epochs": args.epochs},
        "run": {"num_workers": 2, "cpus_per_worker": 0.5, "storage": str(storage)},
        **fields,
    }


def studies(args: argparse.Namespace, data: Path, storage: Path) -> list[dict[str, Any]]:
    """Small members of each Tune family: multi-task, multi-data, and an Optuna sweep."""
    small = {"hidden_dim": 64, "num_layers": 2, "mlp_dim": 128}
    base = _experiment(
        args,
        data,
        storage,
        name="demo",
        model={"name": args.model, "params": small if args.model == "egnn" else {}},
        optim={"lr": 2e-3, "epochs": args.study_epochs},
    )
    return [
        {
            "name": "task-pair",
            "family": "task-pair",
            "models": [args.model],
            "task_pairs": [["mp-formation-energy", "mp-stability"]],
            "base": {**base, "name": "tp"},
        },
        {
            "name": "dataset-pair",
            "family": "dataset-pair",
            "models": [args.model],
            "dataset_pairs": [["materials-project", "oqmd"]],
            "base": {**base, "name": "dp"},
        },
        {
            "name": "sweep",
            "family": "sweep",
            "sweep": {"num_samples": 2, "grace_period": 1, "width": [32, 64], "depth": [2]},
            "base": {**base, "name": "sw"},
        },
    ]


def run(args: argparse.Namespace) -> int:
    from matsci_ray.cli.main import UserError
    from matsci_ray.config import ExperimentConfig, StudyConfig
    from matsci_ray.data.ingest import run_ingest
    from matsci_ray.data.shards import IngestOptions
    from matsci_ray.experiments.study import run_study
    from matsci_ray.ray_env import init_ray
    from matsci_ray.report import load_trials
    from matsci_ray.report.html import write_html
    from matsci_ray.report.tables import build_tables, write_tables
    from matsci_ray.train.evaluate import evaluate_checkpoint, metric_table
    from matsci_ray.train.trainer import build_trainer

    samples, out = args.samples.resolve(), args.out.resolve()
    if not samples.is_dir():
        raise UserError(f"{samples}: sample data sets not found (use --samples)")
    dashboard = init_ray(args.address, num_cpus=args.num_cpus)
    data = out / "data"
    for source, rel in SAMPLE_SOURCES:
        id_split = (
            samples / "materials_project" / "splits" if source == "materials-project" else None
        )
        options = IngestOptions(source=source, id_split_name=str(id_split) if id_split else None)
        manifest = run_ingest(
            source, [samples / r for r in rel], data, options, id_split_dir=id_split
        )
        counts = manifest["counts"]
        print(f"ingested {source}: {counts['total']} records ({counts['rejected']} rejected)")

    print("== single-task: MP formation energy ==")
    config = ExperimentConfig.model_validate(_experiment(args, data, out / "results"))
    result = build_trainer(config).fit()
    if result.error is not None:
        raise result.error
    print(metric_table(evaluate_checkpoint(result.checkpoint.path, "test"), "test"))
    for raw in studies(args, data, out / "studies"):
        print(f"== {raw['family']} study ==")
        run_study(StudyConfig.model_validate(raw))

    trials = load_trials([out / "results", out / "studies"])
    tables = build_tables(trials)
    written = write_tables(trials, out / "report", tables)
    html = write_html(trials, out / "report", tables=tables)
    print(f"checkpoint:  {result.checkpoint.path}")
    print(f"manifests:   {data}/<dataset>/manifest.json")
    print(f"leaderboard: {written['leaderboard']}")
    print(f"report:      {html}")
    print(f"tensorboard: tensorboard --logdir {out}")
    if dashboard:
        print(f"dashboard:   http://{dashboard}")
    return 0
