"""Scale benchmark, its corpus part: an OC20-like corpus of rattled copies of the sample
frames, ingested and streamed through graph building at each size, with memory, bytes per
frame and the training loop's data wait (``python benchmarks/scale.py --parts corpus``;
imported by it, which sets Ray's environment and the import path first)."""

from __future__ import annotations

import argparse
import json
import lzma
import math
import shutil
import time
from pathlib import Path
from typing import Any

from benchmarks.ingest import parse_oc20
from benchmarks.memory import PeakSampler
from benchmarks.train import SAMPLES, fit, make_config, start_ray

TRAJECTORIES = SAMPLES / "oc20" / "trajectories"
RATTLE_A = 0.02  # Å: every neighbour list differs from its source frame's, labels still fit
Row = dict[str, Any]


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
