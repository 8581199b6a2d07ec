"""Scale benchmark: workers across nodes, elastic recovery, and an OC20-like corpus of up to
millions of frames streamed through ingest and graph building. Every figure is a ratio to a
baseline measured in the same run.

Run ``python benchmarks/scale.py`` (``--quick`` for a smoke run; ``--parts corpus`` and
``--frames 100000 1000000`` to pick). See benchmarks/README.md ("Scale") for what each figure
means and the last run's numbers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import lzma
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# Read by Ray when it starts; set before anything imports ray (its workers inherit them).
os.environ.update(
    RAY_DATA_USE_DATASOURCE_V2="0", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0"
)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.cluster, benchmarks.*

import yaml

from benchmarks.ingest import parse_oc20
from benchmarks.memory import PeakSampler
from benchmarks.train import ROOT, SAMPLES, fit, make_config, replicate, start_ray
from tests.cluster import LocalCluster, local_cluster

TRAJECTORIES = SAMPLES / "oc20" / "trajectories"
RATTLE_A = 0.02  # Å: every neighbour list differs from its source frame's, labels still fit
# Each cluster node: one worker of 0.5 CPU and Ray Data's graph tasks (task_cpus 0.5).
WORKER_CPUS = 0.5
Row = dict[str, Any]


# ---------------------------------------------------------------- runs on a local cluster


class History:
    """A run directory's ``history.jsonl``, each row stamped with when this process saw it
    (polled every 0.1 s by :meth:`wait`)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "history.jsonl"
        self.rows: list[Row] = []

    def poll(self) -> list[Row]:
        if self.path.exists():
            lines = [ln for ln in self.path.read_text().splitlines() if ln.strip()]
            now = time.monotonic()
            for line in lines[len(self.rows) :]:
                self.rows.append({**json.loads(line), "seen_at": now})
        return self.rows

    def wait(self, what: str, condition: Callable[[list[Row]], bool], driver: Any) -> None:
        deadline = time.monotonic() + 900
        while not condition(self.poll()):
            if driver.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{what}: not seen (driver exit {driver.returncode})")
            time.sleep(0.1)


def epoch_start(row: Row) -> float:
    """When an epoch's training began (its first batch requested): seen - train - val time."""
    return float(row["seen_at"] - row["time/train_s"] - row["time/val_s"])


def cluster_config(data: Path, tmp: Path, name: str, run: dict[str, Any], epochs: int) -> Path:
    """A YAML config of EGNN on MP formation energy for ``matsci-ray train``."""
    config = make_config(data, tmp, "mp-formation-energy", "egnn", optim={"epochs": epochs})
    raw = config.model_dump(mode="json", exclude_unset=True)
    raw["name"] = name
    raw["data"]["task_cpus"] = WORKER_CPUS
    raw["run"] |= {"threads_per_worker": 1, "placement": "spread", **run}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def start_driver(cluster: LocalCluster, config: Path, log: Path) -> subprocess.Popen[bytes]:
    """``matsci-ray train`` on ``cluster``, in a process of its own (the cluster's token)."""
    env = {**cluster.client_env(), "PYTHONPATH": str(ROOT)}
    cli = Path(sys.executable).parent / "matsci-ray"
    with log.open("wb") as out:
        return subprocess.Popen(
            [str(cli), "train", str(config), "--address", cluster.address],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def finish(driver: subprocess.Popen[bytes], log: Path) -> None:
    if driver.wait(1800) != 0:
        raise RuntimeError(f"training failed:\n{log.read_text(errors='replace')[-3000:]}")


def bench_workers(data: Path, tmp: Path, counts: list[int], epochs: int) -> Row:
    """(a) EGNN on MP with 1, 2, 4 workers spread over as many 1-CPU nodes; samples/s (median
    of epochs 2 onwards) as a ratio to the 1-worker run. Each worker steps on
    ``data.batch_size`` structures, so the global batch grows with the workers."""
    result: Row = {"nodes": max(counts), "runs": {}}
    nodes = {f"n{i}": {} for i in range(max(counts))}
    with local_cluster(nodes, num_cpus=1) as cluster:
        for n in counts:
            run = {"num_workers": n, "cpus_per_worker": WORKER_CPUS}
            config = cluster_config(data, tmp, f"workers-{n}", run, epochs)
            log = tmp / f"workers-{n}.log"
            history = History(tmp / "runs" / f"workers-{n}")
            finish(start_driver(cluster, config, log), log)
            rates = [r["train/samples_per_s"] for r in history.poll()]
            result["runs"][n] = {"samples_per_s": statistics.median(rates[1:]), "by_epoch": rates}
    base = result["runs"][min(counts)]["samples_per_s"]
    for run in result["runs"].values():
        run["ratio"] = run["samples_per_s"] / base
    return result


def bench_elastic(data: Path, tmp: Path, epochs: int) -> Row:
    """(b) ``num_workers: [1, 2]`` over nodes a and b (one 1.5-CPU worker per 2-CPU node):
    SIGKILL a after epoch 2, then add node c. Seconds from the loss to the first epoch's start
    on 1 worker and from c's start to the first epoch's start on 2, each also as a ratio to the
    run's own cold start (launch to epoch 1's start). The run is held after its 1-worker epoch
    (``run.hold_shrunk_while_file_exists``) so that it cannot end before c joins."""
    gate = tmp / "hold-while-shrunk"
    gate.touch()
    run = {
        "num_workers": [1, 2],
        "cpus_per_worker": 1.5,
        "max_failures": 3,
        "elastic_resize_interval_s": 2.0,
        "hold_shrunk_while_file_exists": str(gate),
    }
    config = cluster_config(data, tmp, "elastic", run, epochs)
    log, history = tmp / "elastic.log", History(tmp / "runs" / "elastic")
    with local_cluster({"a": {}, "b": {}}, num_cpus=2) as cluster:
        launched = time.monotonic()
        driver = start_driver(cluster, config, log)
        history.wait("epoch 2", lambda rows: len(rows) >= 2, driver)
        cluster.kill_node("a")
        lost = time.monotonic()
        history.wait("an epoch on 1 worker", lambda rows: rows[-1]["workers"] == 1, driver)
        shrunk = history.rows[-1]
        cluster.add_node("c", num_cpus=2)
        joined = time.monotonic()
        history.wait("2 workers again", lambda rows: rows[-1]["workers"] == 2, driver)
        grown = history.rows[-1]
        gate.unlink()
        finish(driver, log)
    cold = epoch_start(history.rows[0]) - launched
    shrink, grow = epoch_start(shrunk) - lost, epoch_start(grown) - joined
    workers = [r["workers"] for r in history.poll()]
    return {
        "cold_start_s": cold,
        "loss_to_fewer_s": shrink,
        "loss_to_fewer_vs_cold": shrink / cold,
        "arrival_to_full_s": grow,
        "arrival_to_full_vs_cold": grow / cold,
        "workers_by_epoch": workers,
    }


def cluster_parts(args: argparse.Namespace, tmp: Path) -> Row:
    """Parts (a) and (b): MP ingested in process and replicated, no local Ray running."""
    from tests.samples import ingest_in_process

    if not {"workers", "elastic"} & set(args.parts):
        return {}
    docs = SAMPLES / "materials_project" / "summary_docs.jsonl"
    data = ingest_in_process("materials-project", docs, tmp / "mp")
    copies = replicate(data, "materials-project", args.mp_copies, tmp / "mp-rep")
    out: Row = {}
    if "workers" in args.parts:
        out["workers"] = bench_workers(copies, tmp, args.workers, args.epochs)
    if "elastic" in args.parts:
        out["elastic"] = bench_elastic(data, tmp, args.elastic_epochs)
    return out


# ---------------------------------------------------------------- the OC20-like corpus


def rattled_copy(copy: int, dest: str, sigma: float = RATTLE_A) -> int:
    """Write copy ``copy`` of every sample trajectory to ``dest``, positions rattled (seed
    ``copy``), energy and forces carried; one trajectory in memory at a time. Frames written."""
    import ase.io
    import numpy as np
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io.trajectory import Trajectory

    rng, written = np.random.default_rng(copy), 0
    for path in sorted(TRAJECTORIES.glob("*.traj")):
        with Trajectory(str(Path(dest) / f"{path.stem}c{copy}.traj"), "w") as out:
            for atoms in ase.io.iread(path, ":"):
                energy, forces = atoms.get_potential_energy(), atoms.get_forces()
                atoms.positions += rng.normal(0.0, sigma, atoms.positions.shape)
                atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
                out.write(atoms)
                written += 1
    return written


def generate(dest: Path, copies: range) -> int:
    """Copies of the sample trajectories, one Ray task each (streamed: a task holds one
    trajectory); the frames written."""
    import ray

    dest.mkdir(parents=True, exist_ok=True)
    task = ray.remote(num_cpus=1)(rattled_copy)
    return sum(ray.get([task.remote(c, str(dest)) for c in copies]))


def streamed_epoch(data: Path, tmp: Path) -> Row:
    """One pass over the training split through the trainer's own ``graph_dataset`` (read,
    radius graphs at 6 Å), consumed in batches of 32 by this process; frames/s, peaks, and
    the second half's peaks ÷ the first half's."""
    from matsci_ray.train.trainer import graph_dataset

    config = make_config(data, tmp, "s2ef-forces", "egnn")
    start = time.perf_counter()
    with PeakSampler() as sampler:
        ds = graph_dataset(config, "oc20-s2ef", "train")
        for batch in ds.iter_batches(batch_size=32, batch_format="numpy"):
            sampler.frames += len(batch["num_edges"])
    seconds, frames = time.perf_counter() - start, sampler.frames
    return {
        "frames": frames,
        "seconds": seconds,
        "frames_per_s": frames / seconds,
        **sampler.peaks,
        "second_half_vs_first": sampler.halves(),
    }


def parquet_bytes(dataset_dir: Path) -> int:
    return sum(p.stat().st_size for p in dataset_dir.glob("*/part-*.parquet*"))


def ingest_corpus(inputs: Path, out: Path) -> Row:
    from matsci_ray.data.ingest import run_ingest
    from matsci_ray.data.shards import IngestOptions

    files = sorted(inputs.glob("*.traj"))
    start = time.perf_counter()
    manifest = run_ingest(
        "oc20-s2ef", files, out, IngestOptions(source="oc20-s2ef"), progress=False
    )
    seconds = time.perf_counter() - start
    frames = int(manifest["counts"]["total"])
    size = parquet_bytes(out / "oc20-s2ef")
    return {
        "frames": frames,
        "seconds": seconds,
        "frames_per_s": frames / seconds,
        "rejected": manifest["rejects"]["by_reason"],
        "parquet_bytes_per_frame": size / frames,
    }


def bytes_same_frames(tmp: Path) -> Row:
    """Copy 0 of the corpus as Parquet (ingested) and as ``.extxyz.xz`` (ASE's extxyz, xz at
    its default preset), bytes per frame; ratio Parquet ÷ xz."""
    import ase.io

    inputs = tmp / "copy0"
    frames = generate(inputs, range(1))
    parquet = ingest_corpus(inputs, tmp / "copy0-parquet")["parquet_bytes_per_frame"]
    xz = tmp / "copy0.extxyz.xz"
    with lzma.open(xz, "wt") as out:
        for path in sorted(inputs.glob("*.traj")):
            ase.io.write(out, ase.io.iread(path, ":"), format="extxyz")
    xz_per_frame = xz.stat().st_size / frames
    return {
        "frames": frames,
        "parquet_bytes_per_frame": parquet,
        "extxyz_xz_bytes_per_frame": xz_per_frame,
        "parquet_vs_xz": parquet / xz_per_frame,
    }


def data_wait(data: Path, tmp: Path, steps: int) -> Row:
    """Ray Train, EGNN at its default size on S2EF forces (energy by autograd), 2 workers x
    0.5 CPU, graphs built in the stream from the whole corpus (``cache_graphs: never``, no
    sample: each epoch reads its files in a new order) for ``steps`` optimiser steps an epoch
    (``optim.max_steps_per_epoch``), validated on 256 frames; the loop's own data-wait
    fraction, epoch 2."""
    options = {"batch_size": 8, "max_val_samples": 256, "cache_graphs": "never"}
    optim = {"epochs": 2, "max_steps_per_epoch": steps}
    config = make_config(data, tmp, "s2ef-forces", "egnn", data=options, optim=optim)
    run = fit(config)
    epochs = run["per_epoch"]
    train_s, first = epochs["train_s"][-1], epochs["first_batch_s"][-1]
    waited = epochs["data_wait_fraction"][-1] * train_s
    return {
        "steps_per_epoch": steps,
        **{k: run[k] for k in ("data_wait_fraction", "samples_per_s")},
        # once the stream has started: what an epoch of many more steps tends to
        "data_wait_after_first_batch": (waited - first) / max(train_s - first, 1e-9),
        "per_epoch": epochs,
    }


def fresh_ray(tmp: Path, attempts: int = 3) -> None:
    """``start_ray``, again if the node misses Ray's start-up deadline (a loaded machine)."""
    for attempt in range(attempts):
        try:
            start_ray(tmp)
            return
        except Exception:  # Ray raises a bare Exception for a start-up timeout
            if attempt == attempts - 1:
                raise


def corpus_size(
    args: argparse.Namespace, tmp: Path, target: int, per_copy: int, largest: bool
) -> tuple[Row, Path]:
    """Generate and ingest ``target`` frames (figures and the ingested root), or, for the
    largest size with ``--reuse-corpus``, the corpus a ``--keep-corpus`` run left (no ingest
    figures: they are that run's)."""
    if largest and args.reuse_corpus:
        return {"reused": str(args.reuse_corpus)}, args.reuse_corpus
    size = tmp / f"corpus-{target}"
    start = time.perf_counter()
    made = generate(size / "inputs", range(math.ceil(target / per_copy)))
    row: Row = {"generated": made, "generate_s": time.perf_counter() - start}
    row["ingest"] = ingest_corpus(size / "inputs", size / "data")
    shutil.rmtree(size / "inputs")
    return row, size / "data"


def bench_corpus(args: argparse.Namespace, tmp: Path) -> Row:
    """(c) Per corpus size: generate, ingest, one streamed epoch; bytes on copy 0; data wait
    on the largest. Inputs and shards of a size are deleted before the next."""
    import ray

    sample_files = sorted(TRAJECTORIES.glob("*.traj"))
    start = time.perf_counter()
    per_copy = parse_oc20(sample_files)  # the baseline: ASE's read of the sample frames
    parse_rate = per_copy / (time.perf_counter() - start)
    out: Row = {"frames_per_copy": per_copy, "parse_frames_per_s": parse_rate, "sizes": {}}
    fresh_ray(tmp)
    try:
        out["bytes"] = bytes_same_frames(tmp)
        for target in sorted(args.frames):
            largest = target == max(args.frames)
            row, data = corpus_size(args, tmp, target, per_copy, largest)
            if "ingest" in row:
                row["ingest"]["vs_parse"] = row["ingest"]["frames_per_s"] / parse_rate
            fresh_ray(tmp)  # a fresh Ray: the epoch's peaks are its own
            row["epoch"] = streamed_epoch(data, tmp)
            if largest:
                row["data_wait"] = data_wait(data, tmp, args.wait_steps)
            out["sizes"][target] = row
            if largest and args.keep_corpus and data != args.reuse_corpus:
                shutil.move(data, args.keep_corpus)
            shutil.rmtree(tmp / f"corpus-{target}", ignore_errors=True)
            print(f"  corpus {target}: {json.dumps(row, default=str)}", flush=True)
    finally:
        ray.shutdown()
    sizes = sorted(out["sizes"])
    if len(sizes) < 2:
        return out
    small, large = out["sizes"][sizes[0]]["epoch"], out["sizes"][sizes[-1]]["epoch"]
    out["flatness"] = {
        k: large[k] / small[k]
        for k in ("driver_private_mib", "tree_private_mib", "object_store_mib", "frames_per_s")
        if small[k]
    }
    return out


# ---------------------------------------------------------------- report


def markdown(result: Row) -> str:
    lines: list[str] = []
    if "workers" in result:
        lines += ["| workers (nodes) | samples/s | ÷ 1 worker |", "|--:|--:|--:|"]
        for n, run in result["workers"]["runs"].items():
            lines.append(f"| {n} | {run['samples_per_s']:.0f} | {run['ratio']:.2f} |")
        lines.append("")
    if "elastic" in result:
        e = result["elastic"]
        lines += [
            "| elastic | seconds | ÷ cold start |",
            "|---|--:|--:|",
            f"| cold start (launch → epoch 1) | {e['cold_start_s']:.1f} | 1.00 |",
            f"| node lost → first epoch on 1 worker | {e['loss_to_fewer_s']:.1f} "
            f"| {e['loss_to_fewer_vs_cold']:.2f} |",
            f"| node joined → first epoch on 2 | {e['arrival_to_full_s']:.1f} "
            f"| {e['arrival_to_full_vs_cold']:.2f} |",
            "",
        ]
    if "corpus" in result:
        lines += _corpus_markdown(result["corpus"])
    return "\n".join(lines)


def _corpus_markdown(c: Row) -> list[str]:
    b = c["bytes"]
    lines = [
        f"Bytes per frame, the same {b['frames']} frames: "
        f"Parquet {b['parquet_bytes_per_frame']:.0f}, "
        f".extxyz.xz {b['extxyz_xz_bytes_per_frame']:.0f} (ratio {b['parquet_vs_xz']:.2f})",
        "",
        "| frames | ingest frames/s | ÷ parse | Parquet B/frame | epoch frames "
        "| epoch frames/s | peak driver MiB private (shared) | peak tree MiB private "
        "(shared) | peak object store MiB | data wait (after the first batch) |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for target, row in c["sizes"].items():
        i, e = row.get("ingest"), row["epoch"]
        w = row.get("data_wait", {})
        wait = (
            f"{w['data_wait_fraction']:.3f} ({w['data_wait_after_first_batch']:.3f})" if w else "—"
        )
        ingest = (
            f"{i['frames_per_s']:.0f} | {i['vs_parse']:.2f} | {i['parquet_bytes_per_frame']:.0f}"
            if i
            else "— | — | —"  # a reused corpus: its ingest ran in an earlier run
        )
        lines.append(
            f"| {target} | {ingest} | {e['frames']} | {e['frames_per_s']:.0f} "
            f"| {e['driver_private_mib']:.0f} ({e['driver_shared_mib']:.0f}) "
            f"| {e['tree_private_mib']:.0f} ({e['tree_shared_mib']:.0f}) "
            f"| {e['object_store_mib']:.0f} | {wait} |"
        )
    flat = ", ".join(f"{k} {v:.2f}" for k, v in c.get("flatness", {}).items()) or "one size"
    largest = c["sizes"][max(c["sizes"])]["epoch"].get("second_half_vs_first", {})
    halves = ", ".join(f"{k} {v:.2f}" for k, v in largest.items())
    return [
        *lines,
        "",
        f"Largest ÷ smallest size: {flat}",
        f"Largest size, peak over the second half of its epoch ÷ the first half: {halves}",
        "",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--parts",
        nargs="+",
        default=["workers", "elastic", "corpus"],
        choices=["workers", "elastic", "corpus"],
    )
    parser.add_argument(
        "--frames",
        type=int,
        nargs="+",
        default=[100_000, 1_000_000],
        help="corpus sizes (rounded up to whole copies of the 4,207 frames)",
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--epochs", type=int, default=4, help="per workers run (1st: warm-up)")
    parser.add_argument("--elastic-epochs", type=int, default=8)
    parser.add_argument("--mp-copies", type=int, default=4, help="MP train split repeated")
    parser.add_argument(
        "--wait-steps", type=int, default=60, help="data wait: optimiser steps per epoch"
    )
    parser.add_argument(
        "--keep-corpus", type=Path, help="move the largest size's ingested corpus here"
    )
    parser.add_argument(
        "--reuse-corpus",
        type=Path,
        help="a --keep-corpus directory: the largest size streams from it, not generated again",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: small, few epochs")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/scale.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.frames, args.workers, args.epochs, args.mp_copies = [4207, 8414], [1, 2], 2, 1
        args.elastic_epochs, args.wait_steps = 6, 8
    import ray

    started = datetime.datetime.now(datetime.timezone.utc)
    load0 = os.getloadavg()[0]
    result: Row = {}
    with _temp() as tmp:
        if "corpus" in args.parts:
            result["corpus"] = bench_corpus(args, tmp)
        result |= cluster_parts(args, tmp)  # after the local Ray has stopped
    report = {
        "date": started.isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "ray": ray.__version__,
            "load_average_start_end": [load0, os.getloadavg()[0]],
        },
        "wall_s": (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(),
        **result,
    }
    table = markdown(result)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**report, "markdown": table}, indent=1, default=str))
    print(f"wrote {args.out}")


@contextmanager
def _temp() -> Iterator[Path]:
    """A short temp dir under /tmp (Ray's socket paths must stay short), removed at the end."""
    tmp = Path(tempfile.mkdtemp(prefix="mrs-", dir="/tmp"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
