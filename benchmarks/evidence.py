"""Evidence that the encoders learn from geometry, on data where composition explains little or
nothing, each figure beside a structure-blind baseline on the same split:

- Carbon-24 total energy (one element: the composition fit is the training mean per atom times
  the atom count) and Perov-5 heat of formation: every encoder trained on the CDVAE *val* CSV
  (a seeded 10 % of it held out for validation and checkpoint choice) and scored on the *test*
  CSV, over several run seeds.
- OC20 S2EF: one encoder fitted to a few training systems, its force error per element on the
  training split as a ratio to zero forces (surface atoms included), and on the validation
  systems.

Run ``python benchmarks/evidence.py`` (18 training runs and 3 ingests: an EGNN carbon-24 run
takes ~3 minutes on 2 shared cores; ``--quick`` is a smoke run). Writes
``benchmarks/results/evidence.json`` and prints a Markdown table. See benchmarks/README.md,
"Evidence".
"""

from __future__ import annotations

import argparse
import csv
import datetime
import functools
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.update(
    RAY_DATA_USE_DATASOURCE_V2="0", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0"
)

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT.parent / "shared" / "datasets"
sys.path.insert(0, str(Path(__file__).resolve().parent))  # figures.py: shared helpers

# Small encoders and short budgets: the table runs on 2 shared cores.
MODELS: dict[str, dict[str, Any]] = {
    "egnn": {"hidden_dim": 64, "num_layers": 3, "mlp_dim": 128, "num_rbf": 32},
    "megnet": {"dim": 48, "num_blocks": 2, "num_rbf": 50},
    "gala": {"dim": 48, "heads": 4, "num_layers": 2, "ffn_dim": 96, "num_rbf": 16},
    "mace": {"num_channels": 16, "max_ell": 2, "max_L": 0, "correlation": 2, "radial_mlp_dim": 32},
}
# data set: (its CDVAE directory, task, batch size, cutoff Å)
CDVAE: dict[str, tuple[str, str, int, float]] = {
    "carbon-24": ("cdvae/carbon_24", "carbon24-energy", 32, 4.0),
    "perov-5": ("cdvae/perov_5", "perov5-formation-energy", 64, 5.0),
}
STARTED = time.perf_counter()
HOLDOUT = 0.1  # share of the val CSV held out to validate on (checkpoint choice, lr plateau)
OC20_TASK = "s2ef-forces"
# the smallest sample systems (33-41 atoms, 689 frames): enough passes fit in a few minutes
OC20_SYSTEMS = ["random1000100", "random1000120", "random1000141", "random1000169"]


def write_splits(source: Path, dest: Path, seed: int) -> list[Path]:
    """``dest/{train,val,test}.csv``: the CDVAE val CSV's rows split (1 - HOLDOUT) / HOLDOUT
    by a seeded draw per row, streamed row by row, and a link to the test CSV. The reader takes
    a CSV's split from its file name."""
    dest.mkdir(parents=True, exist_ok=True)
    draw = random.Random(seed)
    with open(source / "val.csv", newline="", encoding="utf-8") as fh:
        rows = csv.reader(fh)
        header = next(rows)
        with (
            open(dest / "train.csv", "w", newline="", encoding="utf-8") as train,
            open(dest / "val.csv", "w", newline="", encoding="utf-8") as val,
        ):
            writers = csv.writer(train), csv.writer(val)
            for writer in writers:
                writer.writerow(header)
            for row in rows:
                writers[draw.random() < HOLDOUT].writerow(row)
    (dest / "test.csv").symlink_to(source / "test.csv")
    return [dest / f"{split}.csv" for split in ("train", "val", "test")]


def composition_baselines(root: Path, task: str, split: str) -> dict[str, float]:
    """MSE on ``split`` of two structure-blind guesses: the training mean (per atom times the
    atom count for a total energy) and the per-element references fitted on the training split
    at ingest, where the models' energy readout starts."""
    import numpy as np
    from figures import column

    from matsci_ray.data.manifest import read_manifest
    from matsci_ray.tasks.heads import reference_table
    from matsci_ray.tasks.registry import TASKS

    spec = TASKS[task]
    target = np.asarray(column(root, spec.dataset, split, spec.target), float)
    numbers = [np.asarray(z) for z in column(root, spec.dataset, split, "atomic_numbers")]
    natoms = np.array([len(z) for z in numbers], float)
    summary = read_manifest(root, spec.dataset)["splits"]["train"]
    reference = reference_table(summary["reference_energies"][spec.target]).numpy()
    if spec.extensive:
        mean = summary["targets_per_atom"][spec.target]["mean"] * natoms
        fit = np.array([reference[z].sum() for z in numbers])
    else:
        mean = np.full(len(target), summary["targets"][spec.target]["mean"])
        fit = np.array([reference[z].mean() for z in numbers])
    return {
        "train_mean_mse": float(((mean - target) ** 2).mean()),
        "composition_fit_mse": float(((fit - target) ** 2).mean()),
    }


def experiment(name: str, task: str, root: Path, tmp: Path, **sections: Any) -> dict[str, Any]:
    """The raw config of one run: one Ray Train worker on half a CPU, the model's small size."""
    raw: dict[str, Any] = {
        "name": name,
        "tasks": [task],
        "data": {"root": str(root)},
        "optim": {"lr": 2e-3, "scheduler": "cosine"},
        "run": {"num_workers": 1, "cpus_per_worker": 0.5, "storage": str(tmp / "runs")},
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    return raw


def fit(raw: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Train ``raw`` with the project's trainer; its result and the run's figures."""
    from matsci_ray.config import ExperimentConfig
    from matsci_ray.tasks.registry import metric_key
    from matsci_ray.train.telemetry import read_history
    from matsci_ray.train.trainer import build_trainer

    config = ExperimentConfig.model_validate(raw)
    start = time.perf_counter()
    result = build_trainer(config).fit()
    wall = time.perf_counter() - start
    if result.error is not None:
        raise RuntimeError(f"{raw['name']} failed: {result.error}")
    history = read_history(config.run.storage / config.name)
    metric = metric_key(config.tasks[0])
    train_s = sum(r["time/train_s"] for r in history)
    return result, {
        "epochs": len(history),
        "val_history": [r[metric] for r in history],
        "train_samples_per_s": sum(r["train/samples_per_s"] * r["time/train_s"] for r in history)
        / max(train_s, 1e-9),
        "fit_s": wall,
    }


def best_checkpoint(result: Any) -> Any:
    """The checkpoint with the best validation metric (ties: the later one)."""
    return (result.best_checkpoints[-1] if result.best_checkpoints else (result.checkpoint,))[0]


def cdvae_run(dataset: str, model: str, seed: int, root: Path, tmp: Path, budget: dict) -> dict:
    """One seed of one encoder on a CDVAE set: trained on the val CSV, scored on the test CSV."""
    from matsci_ray.tasks.registry import TASKS
    from matsci_ray.train.evaluate import evaluate_checkpoint

    _, task, batch, cutoff = CDVAE[dataset]
    raw = experiment(
        f"{dataset}-{model}-seed{seed}",
        task,
        root,
        tmp,
        model={"name": model, "params": MODELS[model]},
        data={"cutoff": cutoff, "batch_size": batch},
        optim=budget,
        run={"seed": seed},
    )
    result, out = fit(raw)
    with best_checkpoint(result).as_directory() as directory:
        test = evaluate_checkpoint(Path(directory), "test")
    return {**out, "seed": seed, "test": test[TASKS[task].metric_name], "config": raw}


def summarise(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def cdvae_part(
    args: argparse.Namespace, tmp: Path, progress: Callable[[dict[str, Any]], None]
) -> dict[str, Any]:
    from matsci_ray.data.ingest import run_ingest
    from matsci_ray.data.shards import IngestOptions

    results: dict[str, Any] = {}
    budget = {"epochs": args.epochs, "max_minutes": args.max_minutes}
    for dataset in args.sets:
        folder, task = CDVAE[dataset][:2]
        paths = write_splits(args.samples / folder, tmp / "csv" / dataset, seed=42)
        root = tmp / "data"
        run_ingest(dataset, paths, root, IngestOptions(source=dataset), progress=False)
        entry: dict[str, Any] = {
            "task": task,
            "baselines": composition_baselines(root, task, "test"),
        }
        for model in args.perov_models if dataset == "perov-5" else args.models:
            runs = [cdvae_run(dataset, model, s, root, tmp, budget) for s in args.seeds]
            entry[model] = {"runs": runs, "test": summarise([r["test"] for r in runs])}
            print(json.dumps({dataset: {model: entry[model]["test"]}}), flush=True)
            progress(results | {dataset: entry})
        results[dataset] = entry
    return results


def oc20_part(
    args: argparse.Namespace, tmp: Path, progress: Callable[[dict[str, Any]], None]
) -> dict[str, Any]:
    """One encoder fitted to the training systems of a few OC20 trajectories; its forces per
    element on the training and the validation split (figures.py's ``forces_by_element``)."""
    from figures import baselines, forces_by_element

    from matsci_ray.data.ingest import run_ingest
    from matsci_ray.data.manifest import read_manifest
    from matsci_ray.data.shards import IngestOptions
    from matsci_ray.data.splits import SplitConfig

    paths = [args.samples / "oc20" / "trajectories" / f"{s}.traj" for s in args.oc20_systems]
    root = tmp / "oc20"
    # by system (the reader's group): seed 0 puts random1000169 in val, the other three in train
    split = SplitConfig((0.75, 0.25, 0.0), seed=0)
    options = IngestOptions(source="oc20-s2ef", split=split)
    run_ingest("oc20-s2ef", paths, root, options, progress=False)
    raw = experiment(
        f"oc20-{args.oc20_model}",
        OC20_TASK,
        root,
        tmp,
        model={"name": args.oc20_model, "params": MODELS[args.oc20_model]},
        data={"cutoff": 6.0, "batch_size": 8, "max_train_samples": args.oc20_frames},
        optim={"epochs": args.oc20_epochs, "max_minutes": args.oc20_minutes, "lr": args.oc20_lr},
    )
    result, out = fit(raw)
    splits = read_manifest(root, "oc20-s2ef")["splits"]
    scored = [s for s in ("train", "val") if splits.get(s, {}).get("records")]
    with result.checkpoint.as_directory() as directory:
        by_element = {s: forces_by_element(Path(directory), root, OC20_TASK, s) for s in scored}
    return {
        **out,
        "model": args.oc20_model,
        "systems": [p.stem for p in paths],
        "records": {s: splits[s]["records"] for s in scored},
        "baselines": baselines(root, OC20_TASK) if "val" in scored else {},
        "forces_by_element": by_element,
        "config": raw,
    }


def table(results: dict[str, Any]) -> str:
    lines = [
        "| data set (test split) | model | MSE mean ± sd (n seeds) | training mean | "
        "composition fit | ÷ composition fit | epochs |",
        "|---|---|--:|--:|--:|--:|--:|",
    ]
    for dataset in CDVAE:
        entry = results.get("cdvae", {}).get(dataset)
        if entry is None:
            continue
        base = entry["baselines"]
        for model in MODELS:
            if model not in entry:
                continue
            t = entry[model]["test"]
            epochs = sorted({r["epochs"] for r in entry[model]["runs"]})
            lines.append(
                f"| {dataset} | {model} | {t['mean']:.4g} ± {t['sd']:.2g} ({t['n']}) | "
                f"{base['train_mean_mse']:.4g} | {base['composition_fit_mse']:.4g} | "
                f"{t['mean'] / base['composition_fit_mse']:.2f} | "
                f"{'–'.join(map(str, epochs[:: max(len(epochs) - 1, 1)]))} |"
            )
    oc20 = results.get("oc20")
    if oc20:
        for split, rows in oc20["forces_by_element"].items():
            parts = [
                f"{el} {v['ratio']:.2f} ({100 * v['share_of_zero_force_error']:.0f} %)"
                for el, v in rows.items()
            ]
            lines.append(
                f"\nOC20 {oc20['model']}, {split} forces ÷ zero forces: {', '.join(parts)}"
            )
    return "\n".join(lines)


def save(results: dict[str, Any]) -> None:
    """Write ``results`` over the parts of the same name in ``out``; others stay (--parts)."""
    out = Path(results["out"])
    results |= {"wall_s": time.perf_counter() - STARTED, "load_at_end": os.getloadavg()[0]}
    kept = json.loads(out.read_text()) if out.exists() else {}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(kept | results, indent=1, default=str) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", choices=["cdvae", "oc20"], default=["cdvae", "oc20"])
    parser.add_argument("--sets", nargs="+", choices=list(CDVAE), default=list(CDVAE))
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--perov-models", nargs="+", choices=list(MODELS), default=["egnn", "mace"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=8, help="CDVAE runs: epochs")
    # no cap by default: on a shared machine a time cap makes the budget depend on the load
    parser.add_argument("--max-minutes", type=float, help="CDVAE runs: wall-time cap")
    parser.add_argument("--oc20-model", choices=list(MODELS), default="egnn")
    parser.add_argument("--oc20-systems", nargs="+", default=OC20_SYSTEMS, help="system ids")
    parser.add_argument("--oc20-frames", type=int, help="a seeded sample of N training frames")
    parser.add_argument("--oc20-epochs", type=int, default=30)
    parser.add_argument("--oc20-lr", type=float, default=2e-3)
    parser.add_argument("--oc20-minutes", type=float, default=8.0)
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray")
    parser.add_argument("--samples", type=Path, default=SAMPLES)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/evidence.json")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 1 epoch each")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.epochs, args.oc20_epochs, args.oc20_frames = [0], 1, 1, 16

    import ray

    from matsci_ray.ray_env import init_ray

    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "command": " ".join(["python", *sys.argv]),
        "load_at_start": os.getloadavg()[0],
        "out": str(args.out),
    }
    with tempfile.TemporaryDirectory(
        prefix="evi", dir="/tmp", ignore_cleanup_errors=True
    ) as tmp_name:
        tmp = Path(tmp_name)
        init_ray(num_cpus=args.num_cpus, temp_dir=tmp / "ray")
        for part, measure in (("oc20", oc20_part), ("cdvae", cdvae_part)):
            if part in args.parts:
                # saved as each model ends: a late failure or an interrupt keeps the rest
                partial = functools.partial(
                    lambda done, name: save(results | {name: done}), name=part
                )
                results[part] = measure(args, tmp, partial)
                save(results)
        ray.shutdown()
    print(table(results))


if __name__ == "__main__":
    main()
