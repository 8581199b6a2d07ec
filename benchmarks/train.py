"""Training benchmark: Ray Train throughput per model, data wait, in-pipeline graph building,
1 vs 2 workers, LiPS forces. Every figure is a ratio to a baseline measured in the same run.

Run ``python benchmarks/train.py`` (``--quick`` for a smoke run, ``--models egnn,gala`` to pick).
See benchmarks/README.md for what each row means and the figures of the last full run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Read by Ray when it starts; set before anything imports ray (its workers inherit them).
os.environ.update(
    RAY_DATA_USE_DATASOURCE_V2="0", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0"
)

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT.parent / "shared" / "datasets"
Row = dict[str, Any]


def start_ray(tmp: Path) -> None:
    import ray
    import ray.data

    from matsci_ray.ray_env import init_ray

    ray.shutdown()
    init_ray(num_cpus=2, temp_dir=tmp / f"ray{len(list(tmp.glob('ray*')))}")  # short: socket paths
    ray.data.DataContext.get_current().enable_progress_bars = False


def ingest(root: Path, quick: bool) -> None:
    from matsci_ray.data.ingest import run_ingest
    from matsci_ray.data.registry import DATASETS
    from matsci_ray.data.shards import IngestOptions

    oc20 = sorted((SAMPLES / "oc20" / "trajectories").glob("*.traj"))
    for source in ("materials-project", "lips", "oc20-s2ef"):
        paths = [SAMPLES / r for r in DATASETS.get(source).samples]
        if source == "oc20-s2ef" and quick:  # a few trajectories keep the smoke run short
            paths = oc20[:3]
        run_ingest(source, paths, root, IngestOptions(source=source), progress=False)


def replicate(root: Path, dataset: str, copies: int, dest: Path) -> Path:
    """``dest``: ``dataset`` with its train rows repeated ``copies`` times, so an epoch is long
    enough that per-epoch fixed costs do not swamp the steady state. Written as files of at most
    4096 rows in 1024-row groups, the layout of a real ingest (an MP work unit is 5000
    documents), not many tiny files whose per-task overhead would be measured instead."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from matsci_ray.data.dataset import shard_paths
    from matsci_ray.data.integrity import WRITE_OPTIONS, describe

    shutil.copytree(root / dataset, dest / dataset)
    (dest / dataset / "copies").mkdir()
    paths = shard_paths(root, dataset, "train")
    table = pa.concat_tables([pq.read_table(p) for p in paths] * copies)
    manifest = json.loads((dest / dataset / "manifest.json").read_text())
    manifest["shards"] = [s for s in manifest["shards"] if s["split"] != "train"]
    for k, start in enumerate(range(0, table.num_rows, 4096)):
        part, path = table.slice(start, 4096), dest / dataset / f"copies/{k}.parquet"
        pq.write_table(part, path, row_group_size=1024, **WRITE_OPTIONS)
        shard = {"path": f"copies/{k}.parquet", "split": "train"}
        manifest["shards"].append({**shard, **describe(path, part.num_rows)})
    manifest["splits"]["train"]["records"] *= copies
    (dest / dataset / "manifest.json").write_text(json.dumps(manifest))
    return dest


def make_config(root: Path, tmp: Path, task: str, model: str, **sections: dict[str, Any]) -> Any:
    from matsci_ray.config import ExperimentConfig

    raw: dict[str, Any] = {  # model at its default sizes
        "name": f"bench-{model}-{time.monotonic_ns()}",
        "tasks": [task],
        "model": {"name": model},
        "data": {"root": str(root), "cutoff": 6.0, "batch_size": 32},
        "optim": {"epochs": 3},
        "run": {"num_workers": 2, "cpus_per_worker": 0.5, "storage": str(tmp / "runs")},
    }
    for section, values in sections.items():
        raw[section] = {**raw[section], **values}
    return ExperimentConfig.model_validate(raw)


def fit(config: Any) -> dict[str, Any]:
    """One Ray Train run; per-epoch figures read back from rank 0's TensorBoard events (the
    result's metrics_dataframe only keeps the epochs whose checkpoints were kept)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from matsci_ray.train.trainer import build_trainer

    start = time.perf_counter()
    result = build_trainer(config).fit()
    if result.error is not None:
        raise RuntimeError(f"{config.name} failed: {result.error}")
    events = EventAccumulator(str(config.run.storage / config.name / "tensorboard")).Reload()
    rate = [e.value for e in events.Scalars("train/samples_per_s")]
    wait = [e.value for e in events.Scalars("train/data_wait_fraction")]
    # epoch 1 is warm-up (worker start, first Ray Data execution, allocator); median of the rest
    return {
        "samples_per_s": statistics.median(rate[1:] or rate),
        "data_wait_fraction": statistics.median(wait[1:] or wait),
        "per_epoch": {
            "samples_per_s": rate,
            "data_wait_fraction": wait,
            **{
                tag.split("/")[1]: [e.value for e in events.Scalars(tag)]
                for tag in ("time/train_s", "time/first_batch_s")
                if tag in events.Tags()["scalars"]
            },
        },
        "fit_s": time.perf_counter() - start,
        "load": os.getloadavg()[0],
    }


def compute_rate(config: Any, repeats: int) -> float:
    """Baseline: plain PyTorch in this process on one thread, batches prebuilt (graphs and
    collation done beforehand), the loop's own step; samples/s, median of ``repeats`` passes."""
    import torch
    from torch import nn

    from matsci_ray.graphs.collate import batch_targets, collate
    from matsci_ray.potential import MatSciModel
    from matsci_ray.train.metrics import task_losses
    from matsci_ray.train.trainer import graph_dataset, train_summaries

    torch.manual_seed(config.run.seed)
    model = MatSciModel.from_config(config)  # the loop's own model, losses and optimiser step
    model.fit_normalisation(train_summaries(config))
    targets = batch_targets(model.tasks.values())
    ds = graph_dataset(config, config.datasets[0], "train", config.data.max_train_samples)
    rows = ds.iter_batches(batch_size=config.data.batch_size, batch_format="numpy")
    batches = [collate(r, targets, model.datasets) for r in rows]
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.lr)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one Ray worker's share; 2 threads oversubscribe a shared box

    def one_pass(items: list[Any]) -> float:
        start = time.perf_counter()
        for batch in items:
            losses = task_losses(model, model(batch), batch, config.loss)
            optimizer.zero_grad(set_to_none=True)
            sum(losses.values()).backward()  # type: ignore[union-attr]
            nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip or 1e9)
            optimizer.step()
        return sum(b.num_graphs for b in items) / (time.perf_counter() - start)

    try:
        one_pass(batches[:2])  # warm-up
        return statistics.median(one_pass(batches) for _ in range(repeats))
    finally:
        torch.set_num_threads(threads)


def graph_throughput(root: Path, task: str, copies: int, tmp: Path, repeats: int) -> Row:
    """Radius graphs at 6 Å through the trainer's own ``graph_dataset`` (``read_parquet`` +
    ``map_batches(RadiusGraphTransform)``) consumed by ``iter_batches``, at the configured
    ``data.task_cpus`` and at 1 CPU per task, against ``radius_graph_pbc`` in a plain loop over
    the same structures; structures/s, medians."""
    import numpy as np
    import pyarrow.parquet as pq

    from matsci_ray.data.dataset import shard_paths
    from matsci_ray.graphs.neighbors import radius_graph_pbc
    from matsci_ray.train.trainer import GEOMETRY, graph_dataset

    dataset = make_config(root, tmp, task, "egnn").datasets[0]
    rep = replicate(root, dataset, copies, tmp / f"graphs{time.monotonic_ns()}")
    table = pq.read_table(shard_paths(root, dataset, "train"), columns=GEOMETRY).to_pydict()
    structures = [
        (np.asarray(p, float).reshape(-1, 3), np.asarray(c, float).reshape(3, 3), np.asarray(b))
        for p, c, b in zip(table["positions"], table["cell"], table["pbc"], strict=True)
    ] * copies

    def raw() -> int:
        for pos, cell, pbc in structures:
            radius_graph_pbc(pos, cell, pbc, 6.0)
        return len(structures)

    def pipeline(data: dict[str, Any]) -> Callable[[], int]:
        config = make_config(rep, tmp, task, "egnn", data=data)

        def run() -> int:
            rows = graph_dataset(config, dataset, "train").iter_batches(
                batch_size=32, batch_format="numpy"
            )
            return sum(len(b["num_edges"]) for b in rows)

        return run

    def rate(fn: Callable[[], int]) -> float:
        start = time.perf_counter()
        return fn() / (time.perf_counter() - start)

    default_cpus = make_config(rep, tmp, task, "egnn").data.task_cpus
    fns = {
        "raw": raw,
        f"task_cpus={default_cpus}": pipeline({}),
        "task_cpus=1": pipeline({"task_cpus": 1.0}),
    }
    # first pass: worker start and imports, reported but not steady-state throughput
    row: Row = {"structures": len(structures), "cold": {k: rate(f) for k, f in fns.items()}}
    runs: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):  # interleaved, so load from other jobs hits all of them alike
        for name, fn in fns.items():
            runs[name].append(rate(fn))
    row["median"] = {name: statistics.median(values) for name, values in runs.items()}
    row["all"] = runs
    return row


def measure(args: argparse.Namespace, tmp: Path) -> list[Row]:
    data = tmp / "data"
    ingest(data, args.quick)
    mp = replicate(data, "materials-project", args.mp_copies, tmp / "mp-rep")
    epochs = {"epochs": 2 if args.quick else args.epochs}
    task = "mp-formation-energy"
    rows: list[Row] = []

    def add(
        section: str,
        case: str,
        value: float,
        baseline: float | None,
        goal: str,
        note: str = "",
        **extra: Any,
    ) -> None:
        r = value / baseline if baseline else None
        if "per_epoch" in extra:  # a training run: say how steady it was and how loaded the box
            by_epoch = ", ".join(f"{x:.3g}" for x in extra["per_epoch"]["samples_per_s"])
            note = f"samples/s by epoch {by_epoch}; load {extra['load']:.1f}"
        rows.append(
            dict(
                section=section,
                case=case,
                value=value,
                baseline=baseline,
                ratio=r,
                goal=goal,
                note=note,
                **extra,
            )
        )
        print(f"  {section} | {case}: {value:.4g} (baseline {baseline}) {note}", flush=True)

    # 1 + 2: samples/s per model and data wait, 2 workers x 0.5 CPU
    runs: dict[str, dict[str, Any]] = {}
    for model in args.models:
        config = make_config(mp, tmp, task, model, optim=epochs)
        base = compute_rate(make_config(data, tmp, task, model), args.repeats)
        runs[model] = fit(config)
        add(
            "1 samples/s",
            f"{model}, MP formation energy",
            runs[model]["samples_per_s"],
            base,
            "ratio vs 1-thread in-process",
            **runs[model],
        )
        add("2 data wait", model, runs[model]["data_wait_fraction"], None, "< 0.05")

    # 3: graph building in the Ray Data pipeline vs the raw neighbour-list call. MP x128: a
    # pass over x32 (5k five-atom cells, 2 files) was mostly the pipeline filling up (1.13 s
    # against 2.84 s for x128), which measured ramp-up rather than throughput.
    def graphs() -> None:
        for name, graph_task, copies in (
            ("OC20 S2EF", "s2ef-energy", 1),
            ("MP", task, 8 if args.quick else 128),
        ):
            g = graph_throughput(data, graph_task, copies, tmp, args.repeats)
            raw = g["median"].pop("raw")
            for case, value in g["median"].items():
                add(
                    "3 graphs/s",
                    f"{name} 6 Å, {g['structures']} structures, {case}",
                    value,
                    raw,
                    ">= 0.7",
                    f"first pass {g['cold'][case]:.0f}/s",
                    graph=g,
                )

    # 4: 1 vs 2 workers (EGNN, MP), against the 2 x 0.5 CPU run of part 1 under the same Ray
    def scaling(baseline: float) -> None:
        configs = [(1, 1.0, 1), (1, 1.0, 2), (2, 0.5, 1), (2, 0.5, 2)]
        for workers, cpus, threads in configs[:1] if args.quick else configs:
            run = {"num_workers": workers, "cpus_per_worker": cpus, "threads_per_worker": threads}
            r = fit(make_config(mp, tmp, task, "egnn", optim=epochs, run=run))
            add(
                "4 workers",
                f"egnn, {workers} x {cpus} CPU, {threads} thread(s)",
                r["samples_per_s"],
                baseline,
                "ratio vs 2 x 0.5, threads unset",
                **r,
            )

    graphs()
    if "egnn" in runs:
        scaling(runs["egnn"]["samples_per_s"])

    # 5: LiPS energy + forces (EGNN); compute-bound, so a capped epoch keeps the run short
    lips = {"batch_size": 16, "max_train_samples": 32 if args.quick else 96}
    base = compute_rate(make_config(data, tmp, "lips-forces", "egnn", data=lips), args.repeats)
    r = fit(make_config(data, tmp, "lips-forces", "egnn", data=lips, optim=epochs))
    add(
        "5 LiPS forces",
        "egnn, samples/s",
        r["samples_per_s"],
        base,
        "ratio vs 1-thread in-process",
        **r,
    )
    add("5 LiPS forces", "egnn, data wait", r["data_wait_fraction"], None, "< 0.05")

    # Part 1's EGNN again with every epoch's graphs built in the stream (what a data set above
    # data.cache_max_atoms gets; part 1's small splits are built once and cached): the data
    # wait of the streaming path itself.
    if not args.quick and "egnn" in runs:
        streamed = {"cache_graphs": "never"}
        r = fit(make_config(mp, tmp, task, "egnn", data=streamed, optim=epochs))
        label = "egnn, graphs streamed every epoch"
        base = runs["egnn"]["samples_per_s"]
        add("1 samples/s", label, r["samples_per_s"], base, "ratio vs cached graphs", **r)
        add("2 data wait", label, r["data_wait_fraction"], None, "< 0.05")
    return rows


def markdown(rows: list[Row]) -> str:
    def num(x: float | None) -> str:
        return "—" if x is None else f"{x:.3g}"

    lines = ["| part | case | value | baseline | ratio | goal | notes |", "|---" * 7 + "|"]
    for r in sorted(rows, key=lambda r: r["section"]):
        lines.append(
            f"| {r['section']} | {r['case']} | {num(r['value'])} | "
            f"{num(r['baseline'])} | {num(r['ratio'])} | {r['goal']} | {r['note']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small, few epochs")
    from matsci_ray.models.registry import model_names

    models = model_names()
    parser.add_argument("--models", default=",".join(models), help="comma-separated")
    parser.add_argument("--epochs", type=int, default=4, help="per run; the first is warm-up")
    parser.add_argument("--mp-copies", type=int, default=4, help="MP train split repeated")
    parser.add_argument("--repeats", type=int, default=3, help="baseline / graph repeats")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/train.json")
    args = parser.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    if unknown := set(args.models) - set(models):
        parser.error(f"unknown model(s) {sorted(unknown)}; choose from {', '.join(models)}")
    if args.quick:
        args.mp_copies, args.repeats = 1, 2

    import ray

    tmp = Path(tempfile.mkdtemp(prefix="mrt-"))
    started = datetime.datetime.now().astimezone()
    load0 = os.getloadavg()
    try:
        start_ray(tmp)
        rows = measure(args, tmp)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    table = markdown(rows)
    print(table)
    report = {
        "date": started.isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "ray": ray.__version__,
        },
        "load_average_start_end": [load0[0], os.getloadavg()[0]],
        "wall_s": (datetime.datetime.now().astimezone() - started).total_seconds(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "rows": rows,
        "markdown": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
