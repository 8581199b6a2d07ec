"""matsci-ray against mace-torch's own trainer on LiPS: the same MACE hyperparameters trained by
``mace_run_train`` and by ``matsci-ray`` (Ray Train, 1 and 2 workers) on the same training and
validation frames. Each matsci-ray run trains at the same time as a native run, for the same
training time, so that both see the same load on a shared machine; samples/s and validation
force MAE of each, as a ratio to the native run beside it.

Run ``python benchmarks/mace_native.py`` (~12 minutes on 2 cores; ``--minutes`` sets each
pair's training time). Needs the ``mace`` extra. Writes
``benchmarks/results/mace_native.json`` and prints a Markdown table. See benchmarks/README.md,
"Native trainer".
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import itertools
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.update(
    RAY_DATA_USE_DATASOURCE_V2="0", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0"
)

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT.parent / "shared" / "datasets"
sys.path.insert(0, str(Path(__file__).resolve().parent))  # evidence.py: fit()

# One set of hyperparameters, spelled once for each trainer (a small MACE: 2 shared cores).
CUTOFF = 5.0
MACE: dict[str, Any] = {
    "num_channels": 16,
    "num_interactions": 2,
    "max_ell": 2,
    "max_L": 0,
    "correlation": 2,
    "num_radial": 8,
    "num_cutoff_basis": 5,
    "radial_mlp_dim": 32,
}
# matsci-ray's energy head is as wide as mace-torch's non-linear read-out (``MLP_irreps``, 16x0e)
READOUT_WIDTH = 16
BATCH, LR, FORCE_WEIGHT, SEED = 4, 1e-2, 10.0, 42
ENERGY_KEY, FORCES_KEY = "REF_energy", "REF_forces"  # not ASE's calculator names
# Ray starts its workers at niceness 15 (the raylet's ``worker_niceness``); the native run gets
# the same, or on a shared machine every ordinary process outranks only the matsci-ray side.
RAY_WORKER_NICENESS = 15
STARTUP_MINUTES = 1.5  # the native run's start-up (imports, graphs) on the shared machine
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?)")
EPOCH_LINE = re.compile(r"Epoch (\d+):.*MAE_F=\s*([\d.]+) meV")


def export_xyz(root: Path, split: str, dest: Path) -> int:
    """The ingested ``split`` of LiPS as extended XYZ for the native trainer: the very frames
    matsci-ray trains on, read back from its Parquet shards one shard at a time."""
    import ase
    import ase.io
    import numpy as np
    import pyarrow.parquet as pq

    from matsci_ray.data.dataset import shard_paths

    count = 0
    with open(dest, "w") as fh:
        for path in shard_paths(root, "lips", split):
            table = pq.read_table(path).to_pydict()
            for z, pos, cell, energy, forces in zip(
                *(table[c] for c in ("atomic_numbers", "positions", "cell", "energy", "forces")),
                strict=True,
            ):
                atoms = ase.Atoms(
                    numbers=z,
                    positions=np.reshape(pos, (-1, 3)),
                    cell=np.reshape(cell, (3, 3)),
                    pbc=True,
                )
                atoms.info[ENERGY_KEY] = energy
                atoms.arrays[FORCES_KEY] = np.reshape(forces, (-1, 3))
                ase.io.write(fh, atoms, format="extxyz")
                count += 1
    return count


def mean_neighbours(xyz: Path) -> float:
    """Neighbours per atom within the cutoff over the training frames: both trainers divide
    each neighbour sum by this same constant (mace-torch measures it the same way)."""
    import ase.io
    import numpy as np

    from matsci_ray.graphs.neighbors import radius_graph_pbc

    edges = atoms = 0
    for frame in ase.io.iread(str(xyz)):
        graph = radius_graph_pbc(frame.positions, np.asarray(frame.cell), frame.pbc, CUTOFF)
        edges += graph[0].shape[-1]
        atoms += len(frame)
    return edges / atoms


def native_command(work: Path, train: Path, val: Path, avg: float, epochs: int) -> list[str]:
    p = MACE
    return [
        "mace_run_train",
        "--name=native",
        f"--work_dir={work}",
        f"--train_file={train}",
        f"--valid_file={val}",
        f"--energy_key={ENERGY_KEY}",
        f"--forces_key={FORCES_KEY}",
        "--E0s=average",  # per-element references by least squares, as matsci-ray fits them
        "--model=MACE",
        f"--r_max={CUTOFF}",
        f"--num_channels={p['num_channels']}",
        f"--max_L={p['max_L']}",
        f"--max_ell={p['max_ell']}",
        f"--correlation={p['correlation']}",
        f"--num_interactions={p['num_interactions']}",
        f"--num_radial_basis={p['num_radial']}",
        f"--num_cutoff_basis={p['num_cutoff_basis']}",
        f"--radial_MLP=[{p['radial_mlp_dim']}, {p['radial_mlp_dim']}, {p['radial_mlp_dim']}]",
        f"--avg_num_neighbors={avg}",
        f"--MLP_irreps={READOUT_WIDTH}x0e",
        "--compute_avg_num_neighbors=False",
        "--loss=weighted",
        "--energy_weight=1.0",
        f"--forces_weight={FORCE_WEIGHT}",
        f"--batch_size={BATCH}",
        f"--valid_batch_size={BATCH}",
        f"--lr={LR}",
        "--optimizer=adam",
        f"--max_num_epochs={epochs}",
        "--error_table=PerAtomMAE",
        "--default_dtype=float32",
        "--device=cpu",
        f"--seed={SEED}",
        "--patience=1000",
    ]


def native_beside(
    run: Path, work: Path, files: tuple[Path, Path], avg: float, budget_s: float
) -> list[str]:
    """Run ``mace_run_train`` while the matsci-ray run ``run`` trains: started once that run's
    first epoch is in its history (its workers are up), ended ``budget_s`` after its own log
    says 'Started training' (data preparation before that is not counted, as matsci-ray's
    start-up is not). One torch thread: a matsci-ray worker of ≤ 1 CPU gets one; Ray's worker
    niceness. Runs in a thread beside the matsci-ray run; returns the command."""
    give_up = time.time() + 900  # the matsci-ray run failed before its first epoch
    while not (run / "history.jsonl").exists():
        if time.time() > give_up:
            return []
        time.sleep(0.5)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = native_command(work, *files, avg, epochs=100_000)
    with open(work.with_suffix(".out"), "w") as out:
        process = subprocess.Popen(
            command,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=work.parent,
            preexec_fn=lambda: os.nice(RAY_WORKER_NICENESS),
        )
        while process.poll() is None and _native_started(work) is None:
            time.sleep(0.5)
        started = _native_started(work)
        if started is not None:
            time.sleep(max(0.0, started + budget_s - time.time()))
        process.terminate()
        process.wait()
    return command


def _native_log(work: Path) -> list[str]:
    logs = list((work / "logs").glob("*run*.log"))
    return logs[0].read_text().splitlines() if logs else []


def _native_started(work: Path) -> float | None:
    return next((_stamp(li) for li in _native_log(work) if "Started training" in li), None)


def read_native(work: Path, n_train: int, budget_s: float) -> dict[str, Any]:
    """The native run's epochs from its log: each epoch (training plus validation) is the gap
    between consecutive epoch lines; the first (after the initial validation) is warm-up.
    ``window``: when it trained (Unix seconds), from 'Started training' to its last epoch."""
    log = _native_log(work)
    started = _native_started(work) or 0.0
    epochs = [(_stamp(li), float(m[2]) / 1e3) for li in log if (m := EPOCH_LINE.search(li))]
    epochs = [(t, mae) for t, mae in epochs if t - started <= budget_s]
    epoch_s = [b[0] - a[0] for a, b in itertools.pairwise(epochs)]
    return {
        "epochs": len(epochs),
        "training_s": epochs[-1][0] - started,
        "window": (started, epochs[-1][0]),
        "epoch_s": epoch_s,
        "samples_per_s": n_train / statistics.median(epoch_s),
        "val_force_mae": epochs[-1][1],
        "val_force_mae_history": [mae for _, mae in epochs],
    }


def _stamp(line: str) -> float:
    """The time of a mace-torch log line."""
    moment = LOG_TIME.match(line).group(1)  # type: ignore[union-attr]
    return datetime.datetime.fromisoformat(moment).timestamp()


def run_matsci(
    name: str, root: Path, tmp: Path, avg: float, workers: int, minutes: float, extra: float
) -> dict:
    """matsci-ray's trainer, ``workers`` × 0.5 CPU, the native run's global batch, for
    ``minutes + extra`` (``optim.max_minutes``; its error is read after ``minutes``); its
    history, whose rates :func:`rates_beside` reads once the native run has finished."""
    from evidence import experiment, fit

    from matsci_ray.train.telemetry import read_history

    raw = experiment(
        name,
        "lips-forces",
        root,
        tmp,
        model={
            "name": "mace",
            "params": {**MACE, "avg_num_neighbors": avg},
            "head_hidden": READOUT_WIDTH,
        },
        data={"cutoff": CUTOFF, "batch_size": BATCH // workers},
        optim={"lr": LR, "scheduler": "none", "epochs": 10_000, "max_minutes": minutes + extra},
        loss={"force_weight": FORCE_WEIGHT},
        run={"num_workers": workers, "seed": SEED},
    )
    _, out = fit(raw)
    history = read_history(tmp / "runs" / raw["name"])
    epoch_s = [r["time/train_s"] + r["time/val_s"] for r in history]
    elapsed = zip(history, itertools.accumulate(epoch_s), strict=True)
    within = [r["val/lips-forces/mae"] for r, t in elapsed if t <= 60 * minutes]
    return {
        **out,
        "workers": workers,
        "epoch_s": epoch_s,
        "val_force_mae": history[-1]["val/lips-forces/mae"],
        "val_force_mae_history": [r["val/lips-forces/mae"] for r in history],
        # the limit is checked after each epoch, so the last one ends past the native time
        "val_force_mae_within_native_time": within[-1] if within else None,
        "epochs_within_native_time": len(within),
        "training_s": sum(epoch_s),
        "history": history,
        "config": raw,
    }


def rates_beside(matsci: dict[str, Any], window: tuple[float, float]) -> dict[str, Any]:
    """matsci-ray's rates over the epochs it trained wholly while the native run trained
    (``window``): its run starts before the native one and goes on after it, and those
    epochs had the machine to themselves. An epoch lasts from the previous epoch's history
    stamp to its own (training, validation, checkpoint and report: all of it), as the native
    epoch lasts from one epoch line to the next; the median leaves out outliers."""
    from matsci_ray.train.telemetry import HISTORY_TIME

    start, end = window
    beside = [
        (row, row[HISTORY_TIME] - before[HISTORY_TIME])
        for before, row in itertools.pairwise(matsci["history"])
        if before[HISTORY_TIME] >= start and row[HISTORY_TIME] <= end
    ]
    if not beside:
        raise RuntimeError("no matsci-ray epoch ran wholly beside the native run")
    return {
        "epochs_beside_native": [row["epoch"] for row, _ in beside],
        "epoch_s_beside_native": [wall for _, wall in beside],
        "samples_per_s": statistics.median(
            row["train/samples_per_s"] * row["time/train_s"] / wall for row, wall in beside
        ),
        "train_only_samples_per_s": statistics.median(
            row["train/samples_per_s"] for row, _ in beside
        ),
    }


def table(results: dict[str, Any]) -> str:
    lines = [
        "| trainer (trained side by side) | epochs side by side | samples/s | ÷ native "
        "| val force MAE eV/Å | ÷ native |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for pair in results["pairs"]:
        native, matsci = pair["native"], pair["matsci_ray"]
        mae = matsci["val_force_mae_within_native_time"] or matsci["val_force_mae"]
        for label, r, epochs, err in (
            ("mace_run_train, 1 thread", native, native["epochs"], native["val_force_mae"]),
            (
                f"matsci-ray, {matsci['workers']} worker(s) × 0.5 CPU",
                matsci,
                # its run goes on past the native time (the native start-up): not counted
                len(matsci["epochs_beside_native"]),
                mae,
            ),
        ):
            lines.append(
                f"| {label} | {epochs} | {r['samples_per_s']:.2f} | "
                f"{r['samples_per_s'] / native['samples_per_s']:.2f} | {err:.4f} | "
                f"{err / native['val_force_mae']:.2f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=4.0, help="training time of each run")
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=1, help="pairs of each worker count")
    parser.add_argument("--samples", type=Path, default=SAMPLES)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/mace_native.json")
    args = parser.parse_args()

    import ray

    from matsci_ray.data.ingest import run_ingest
    from matsci_ray.data.shards import IngestOptions
    from matsci_ray.data.splits import SplitConfig
    from matsci_ray.ray_env import init_ray

    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "command": " ".join(["python", *sys.argv]),
        "load_at_start": os.getloadavg()[0],
        "hyperparameters": {
            **MACE,
            "cutoff": CUTOFF,
            "readout_width": READOUT_WIDTH,
            "batch": BATCH,
            "lr": LR,
            "seed": SEED,
        },
    }
    with tempfile.TemporaryDirectory(
        prefix="mnat", dir="/tmp", ignore_cleanup_errors=True
    ) as tmp_name:
        tmp = Path(tmp_name)
        init_ray(num_cpus=2, temp_dir=tmp / "ray")
        root = tmp / "data"
        split = IngestOptions(source="lips", split=SplitConfig((0.8, 0.2, 0.0), seed=SEED))
        run_ingest("lips", [args.samples / "lips/lips_devset.extxyz"], root, split, progress=False)
        train, val = tmp / "train.xyz", tmp / "val.xyz"
        n_train = export_xyz(root, "train", train)
        results["frames"] = {"train": n_train, "val": export_xyz(root, "val", val)}
        avg = results["avg_num_neighbors"] = mean_neighbours(train)
        budget = 60 * args.minutes
        results["pairs"] = []
        # each pair trains at the same time (the same load); repeats alternate worker counts
        for repeat, workers in itertools.product(range(args.repeats), args.workers):
            name = f"lips-mace-{workers}w-{repeat}"
            work, run = tmp / f"native-{workers}-{repeat}", tmp / "runs" / name
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                beside = pool.submit(native_beside, run, work, (train, val), avg, budget)
                # its own budget, plus the native run's start-up after its first epoch
                matsci = run_matsci(name, root, tmp, avg, workers, args.minutes, STARTUP_MINUTES)
                command = beside.result()
            native = read_native(work, n_train, budget) | {"command": " ".join(command)}
            matsci |= rates_beside(matsci, native["window"])
            del matsci["history"]
            results["pairs"].append({"native": native, "matsci_ray": matsci})
            print(table(results), flush=True)
        ray.shutdown()
    results["load_at_end"] = os.getloadavg()[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
