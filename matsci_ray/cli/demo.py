"""``matsci-ray demo``: the whole pipeline on the shared samples, on a local Ray.

Ingests every sample source, trains a small model on MP formation energy, evaluates it on the
test split, and prints where to look (dashboard, TensorBoard, checkpoint, manifests).
"""

from __future__ import annotations

import argparse
from pathlib import Path

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
        help="ingest the samples, train and evaluate a model (local Ray)",
        description="End to end on the shared samples: every source ingested, one model "
        "trained on Ray Train and evaluated on the test split.",
    )
    p.add_argument(
        "--samples",
        type=Path,
        default=Path("../shared/datasets"),
        help="the sample data sets (default ../shared/datasets)",
    )
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--model", default="egnn", choices=["egnn", "megnet", "gala"])
    p.add_argument("--num-cpus", type=int, help="CPUs for the local Ray (default: all)")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from matsci_ray.cli.main import UserError
    from matsci_ray.config import ExperimentConfig
    from matsci_ray.data.ingest import run_ingest
    from matsci_ray.data.shards import IngestOptions
    from matsci_ray.ray_env import init_ray
    from matsci_ray.train.evaluate import evaluate_checkpoint, metric_table
    from matsci_ray.train.trainer import build_trainer

    samples, out = args.samples.resolve(), args.out.resolve()
    if not samples.is_dir():
        raise UserError(f"{samples}: sample data sets not found (use --samples)")
    dashboard = init_ray(args.address, num_cpus=args.num_cpus, include_dashboard=True)
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

    config = ExperimentConfig.model_validate(
        {
            "name": f"demo-mp-formation-{args.model}",
            "tasks": ["mp-formation-energy"],
            "data": {"root": str(data), "cutoff": 6.0, "batch_size": 32},
            "model": {"name": args.model},
            "optim": {"lr": 1e-3, "epochs": args.epochs},
            "run": {"num_workers": 2, "cpus_per_worker": 0.5, "storage": str(out / "results")},
        }
    )
    result = build_trainer(config).fit()
    if result.error is not None:
        raise result.error
    print(metric_table(evaluate_checkpoint(result.checkpoint.path, "test"), "test"))
    print(f"checkpoint:  {result.checkpoint.path}")
    print(f"manifests:   {data}/<dataset>/manifest.json")
    print(f"tensorboard: tensorboard --logdir {out / 'results'}")
    if dashboard:
        print(f"dashboard:   http://{dashboard}")
    return 0
