"""Scale benchmark, its cluster parts: samples/s of 1, 2, 4 workers on as many nodes of a
local cluster, and an elastic run's recovery from a lost node and growth onto a new one, each
beside a cold start measured in the same run (``python benchmarks/scale.py --parts workers
elastic``; imported by it, which sets Ray's environment and the import path first)."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from benchmarks.train import ROOT, SAMPLES, make_config, replicate
from tests.cluster import LocalCluster, local_cluster

# Each cluster node: one worker of 0.5 CPU and Ray Data's graph tasks (task_cpus 0.5).
WORKER_CPUS = 0.5
Row = dict[str, Any]


class History:
    """A run directory's ``history.jsonl``, each row stamped with when this process saw it
    (polled every 0.1 s by :meth:`wait`).

    A restart from an earlier checkpoint rewrites the file: the epochs after the checkpoint
    are dropped and trained again, so a row may change in place (epoch 2 on 2 workers, then
    epoch 2 on 1). Rows from the first line that differs on are read again, seen anew."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "history.jsonl"
        self.lines: list[str] = []
        self.rows: list[Row] = []

    def poll(self) -> list[Row]:
        if self.path.exists():
            lines = [ln for ln in self.path.read_text().splitlines() if ln.strip()]
            same = 0
            for old, new in zip(self.lines, lines, strict=False):
                if old != new:
                    break
                same += 1
            now = time.monotonic()
            self.rows = self.rows[:same] + [
                {**json.loads(line), "seen_at": now} for line in lines[same:]
            ]
            self.lines = lines
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
