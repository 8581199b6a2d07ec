"""``matsci-ray demo``: the whole pipeline on the shared samples, on a local Ray.

Ingests every sample source; trains MP formation energy (evaluated on the test split); runs a
multi-task pair (additive and PCGrad), a multi-data pair and a 2-trial Optuna sweep on Ray
Tune; writes the leaderboard; prints where to look (dashboard, TensorBoard, report).
"""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path
from typing import Any

from matsci_ray.cli.main import add_verbose
from matsci_ray.data.registry import DATASETS
from matsci_ray.models.registry import MODELS, model_names


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
    p.add_argument("--model", default="egnn", choices=model_names())
    p.add_argument("--num-cpus", type=int, help="CPUs for the local Ray (default: all)")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    p.add_argument(
        "--keep-alive",
        action="store_true",
        help="at the end, keep the local Ray and its dashboard up until Ctrl-C",
    )
    add_verbose(p)
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
    base = _experiment(
        args,
        data,
        storage,
        name="demo",
        model={"name": args.model, "params": MODELS.get(args.model).small_params()},
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
    import ray

    from matsci_ray.cli.main import UserError
    from matsci_ray.console.ray_logs import RAY_LOG, ray_console

    samples, out = args.samples.resolve(), args.out.resolve()
    if not samples.is_dir():
        raise UserError(f"{samples}: sample data sets not found (use --samples)")
    ours = not ray.is_initialized()  # a Ray this command starts is its to stop
    with ray_console(args.address, args.num_cpus, out / RAY_LOG, args.verbose) as dashboard:
        if dashboard:  # while the demo runs (and after it, with --keep-alive)
            print(f"dashboard:   http://{dashboard}")
        data = out / "data"
        ingest_samples(samples, data)
        checkpoint = single_task(args, data, out)
        run_studies(args, data, out)
        written = write_report(out)
        print("where to look:")
        print(f"  report:      {written['html']}")
        print(f"  leaderboard: {written['leaderboard']}")
        print(f"  tensorboard: tensorboard --logdir {out}")
        print(f"  checkpoint:  {checkpoint}")
        print(f"  manifests:   {data}/<dataset>/manifest.json")
        if not args.verbose:
            print(f"  Ray logs:    {out / RAY_LOG}")
        if args.keep_alive:
            keep_alive(dashboard, stop_ray=ours)
    return 0


def ingest_samples(samples: Path, data: Path) -> None:
    """Every registered source that has a sample, ingested into ``data``."""
    from matsci_ray.data.ingest import run_ingest
    from matsci_ray.data.shards import IngestOptions

    for spec in (d for d in DATASETS.specs().values() if d.samples):
        source, rel = spec.name, spec.samples
        id_split = samples / spec.id_split if spec.id_split else None
        options = IngestOptions(source=source, id_split_name=str(id_split) if id_split else None)
        manifest = run_ingest(
            source,
            [samples / r for r in rel],
            data,
            options,
            id_split_dir=id_split,
            progress=sys.stderr.isatty(),  # a bar on a terminal, not in a log
        )
        counts = manifest["counts"]
        print(f"ingested {source}: {counts['total']} records ({counts['rejected']} rejected)")


def single_task(args: argparse.Namespace, data: Path, out: Path) -> Path:
    """MP formation energy on Ray Train (a line per epoch), then its test-split table."""
    from matsci_ray.cli.train import fit
    from matsci_ray.config import ExperimentConfig
    from matsci_ray.train.evaluate import evaluate_checkpoint, metric_table

    print("== single-task: MP formation energy ==")
    config = ExperimentConfig.model_validate(_experiment(args, data, out / "results"))
    checkpoint = Path(fit(config, verbose=args.verbose).checkpoint.path)
    print(metric_table(evaluate_checkpoint(checkpoint, "test"), "test"))
    return checkpoint


def run_studies(args: argparse.Namespace, data: Path, out: Path) -> None:
    from matsci_ray.config import StudyConfig
    from matsci_ray.experiments.study import run_study

    for raw in studies(args, data, out / "studies"):
        print(f"== {raw['family']} study ==")
        run_study(StudyConfig.model_validate(raw), verbose=args.verbose)


def write_report(out: Path) -> dict[str, Path]:
    """The leaderboard tables and the HTML report of every run and study under ``out``."""
    from matsci_ray.report import load_trials
    from matsci_ray.report.html import write_html
    from matsci_ray.report.tables import build_tables, write_tables

    trials = load_trials([out / "results", out / "studies"])
    tables = build_tables(trials)
    written = write_tables(trials, out / "report", tables)
    return {**written, "html": write_html(trials, out / "report", tables=tables)}


def keep_alive(dashboard: str | None, stop_ray: bool, stop: threading.Event | None = None) -> None:
    """Keep this process, and the local Ray it started with its dashboard, up until Ctrl-C
    (or ``stop`` is set); then stop that Ray (``stop_ray``) before returning."""
    where = f" and its dashboard at http://{dashboard}" if dashboard else ""
    stop = stop or threading.Event()
    try:  # from the prompt on: a Ctrl-C right after it is one too
        print(f"Ray{where} stay up: press Ctrl-C to stop", flush=True)
        while not stop.wait(0.5):  # a short wait: Ctrl-C is raised between two of them
            pass
    except KeyboardInterrupt:
        pass
    if stop_ray:
        import ray

        ray.shutdown()
    print("Ray stopped" if stop_ray else "done", flush=True)
