"""Training steps on a GPU against the same steps on the same machine's CPU, and what TF32,
bf16 and ``torch.compile`` change on the GPU (and bf16 on the CPU).

Every predictive encoder of the registry at its default size (what a config without
``model.params`` trains), on LiPS batches (``--batch`` frames of 83 atoms, 5 Å), one process:
the training step as the loop takes it (``MatSciModel``, the task's loss, AdamW, gradient
clipping, under ``training_autocast``). Energy and forces (``lips-forces``: a double backward)
on the CPU (all its cores) in fp32 and bf16, and on the GPU in fp32, TF32 and bf16; energy alone
(``lips-energy``) eager and compiled on the GPU, since force tasks train uncompiled
(``matsci_ray/train/precision.py``). Each variant is timed in ``--rounds`` blocks of steps,
interleaved across variants, after warm-up steps (compilation included there, and reported);
the GPU is synchronised at the ends of each block. Figures: the median samples/s over the
blocks, its spread ((max - min) / median), and each ratio against its baseline in the same
run (GPU fp32 against the CPU; bf16 against fp32 on each device; TF32 against GPU fp32;
compiled against eager).

Run ``python benchmarks/gpu.py`` (~5-6 minutes on one H200 with 16 cores); without a CUDA
device it measures the CPU variants alone. Needs the ``mace`` extra for MACE. Writes
``benchmarks/results/gpu.json`` (``--out``) and prints a Markdown table. See
benchmarks/README.md, "GPU".
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.samples: the Ray-free ingest the tests use
CUTOFF = 5.0
Step = Callable[[], None]


def lips_batches(tmp: Path, size: int) -> tuple[Path, dict[str, list[Any]]]:
    """LiPS ingested in this process; its train frames as batches of ``size``, per task."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from matsci_ray.data.dataset import shard_paths
    from matsci_ray.graphs.batching import RadiusGraphTransform, rows_to_pyg_batch
    from matsci_ray.tasks.registry import TASKS
    from tests.samples import SAMPLES, ingest_in_process

    root = ingest_in_process("lips", SAMPLES / "lips" / "lips_devset.extxyz", tmp / "data")
    table = pa.concat_tables(pq.read_table(p) for p in shard_paths(root, "lips", "train"))
    columns = {c: table[c].to_numpy(zero_copy_only=False) for c in table.column_names}
    rows = RadiusGraphTransform(CUTOFF)(columns)
    batches: dict[str, list[Any]] = {}
    for task in ("lips-forces", "lips-energy"):
        starts = range(0, len(table) - size + 1, size)
        picked = [{k: v[s : s + size] for k, v in rows.items()} for s in starts]
        batches[task] = [rows_to_pyg_batch(p, TASKS[task].columns) for p in picked]
    return root, batches


def make_step(
    root: Path,
    name: str,
    task: str,
    batches: list[Any],
    device: str,
    precision: str,
    compiled: bool,
) -> Step:
    """One training step of encoder ``name`` on ``task`` as the loop takes it, cycling through
    ``batches`` (moved to ``device`` once, beforehand)."""
    from matsci_ray.config import ExperimentConfig, LossConfig
    from matsci_ray.data.manifest import read_manifest
    from matsci_ray.potential import MatSciModel
    from matsci_ray.train.metrics import task_losses
    from matsci_ray.train.precision import maybe_compile, set_matmul_precision, training_autocast

    config = ExperimentConfig.model_validate(
        {
            "name": f"{name}-{task}",
            "tasks": [task],
            "data": {"root": str(root), "cutoff": CUTOFF},
            "model": {"name": name},
            "run": {"precision": precision, "compile": compiled},
        }
    )
    torch.manual_seed(0)
    model = MatSciModel.from_config(config)
    model.fit_normalisation({"lips": read_manifest(root, "lips")["splits"]["train"]})
    model = model.to(device).train()
    if compiled:
        assert maybe_compile(model, config, torch.device(device))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    on_device = [copy.copy(b).to(device) for b in batches]
    position = [0]

    def step() -> None:
        set_matmul_precision(config)  # per step: the variants share one process's flag
        batch = on_device[position[0] % len(on_device)]
        position[0] += 1
        with training_autocast(config, torch.device(device)):
            preds = model(batch)
        loss = torch.stack(list(task_losses(model, preds, batch, LossConfig()).values())).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        torch.backends.cuda.matmul.fp32_precision = "ieee"

    return step


def timed(step: Step, device: str, seconds: float, least: int) -> tuple[int, float]:
    """Steps run in one block of about ``seconds`` (at least ``least``), and the block's time."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start, steps = time.perf_counter(), 0
    while steps < least or time.perf_counter() - start < seconds:
        step()
        steps += 1
        if device == "cuda" and steps % 5 == 0:
            sync()  # a queue of unsynchronised steps would end the block early
    sync()
    return steps, time.perf_counter() - start


VARIANTS = {  # name: (task, device, precision, compiled)
    "cpu": ("lips-forces", "cpu", "fp32", False),
    "cpu-bf16": ("lips-forces", "cpu", "bf16", False),
    "gpu": ("lips-forces", "cuda", "fp32", False),
    "gpu-tf32": ("lips-forces", "cuda", "tf32", False),
    "gpu-bf16": ("lips-forces", "cuda", "bf16", False),
    "gpu-energy": ("lips-energy", "cuda", "fp32", False),
    "gpu-energy-compiled": ("lips-energy", "cuda", "fp32", True),
}
BASELINE = {
    "cpu-bf16": "cpu",
    "gpu": "cpu",
    "gpu-tf32": "gpu",
    "gpu-bf16": "gpu",
    "gpu-energy-compiled": "gpu-energy",
}


def measure_encoder(
    name: str, root: Path, batches: dict[str, list[Any]], args: argparse.Namespace
) -> dict[str, Any]:
    """Every variant of encoder ``name``: samples/s per block, warm-up time, or why it failed."""
    from matsci_ray.train.precision import NO_AUTOCAST

    steps: dict[str, Step] = {}
    out: dict[str, Any] = {}
    for variant, (task, device, precision, compiled) in VARIANTS.items():
        if device == "cuda" and not torch.cuda.is_available():
            continue
        if precision == "bf16" and name in NO_AUTOCAST:
            out[variant] = {"skipped": NO_AUTOCAST[name]}
            continue
        try:
            step = make_step(root, name, task, batches[task], device, precision, compiled)
            warm = timed(step, device, 0.0, args.warmup if device == "cuda" else 1)[1]
        except Exception as error:  # a variant that cannot run is a finding, not a crash
            out[variant] = {"failed": f"{type(error).__name__}: {str(error)[:300]}"}
            torch._dynamo.reset()
            continue
        steps[variant] = step
        out[variant] = {"warmup_s": warm, "samples_per_s": []}
        if device == "cuda":
            out[variant]["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
            torch.cuda.reset_peak_memory_stats()
    for _ in range(args.rounds):
        for variant, step in steps.items():
            device = VARIANTS[variant][1]
            least = args.cpu_steps if device == "cpu" else 10
            count, seconds = timed(step, device, args.block_seconds, least)
            out[variant]["samples_per_s"].append(count * args.batch / seconds)
    torch._dynamo.reset()
    return out


def summarise(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for name, variants in results.items():
        row: dict[str, Any] = {"encoder": name}
        for variant, figures in variants.items():
            rates = figures.get("samples_per_s")
            if not rates:
                row[variant] = figures.get("failed") or figures.get("skipped")
                continue
            median = statistics.median(rates)
            row[variant] = median
            row[f"{variant} spread"] = (max(rates) - min(rates)) / median
            base = BASELINE.get(variant)
            if base and isinstance(row.get(base), float):
                row[f"{variant} / {base}"] = median / row[base]
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    def cell(row: dict[str, Any], key: str, digits: int = 2) -> str:
        value = row.get(key)
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value or "-")[:60]

    lines = [
        "| encoder | CPU samples/s | CPU bf16 / fp32 | GPU fp32 samples/s | GPU / CPU "
        "| GPU TF32 / fp32 | GPU bf16 / fp32 | GPU energy-only compiled / eager |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['encoder']} | {cell(r, 'cpu', 1)} | {cell(r, 'cpu-bf16 / cpu')} "
            f"| {cell(r, 'gpu', 1)} | {cell(r, 'gpu / cpu')} | {cell(r, 'gpu-tf32 / gpu')} "
            f"| {cell(r, 'gpu-bf16 / gpu')} | {cell(r, 'gpu-energy-compiled / gpu-energy')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16, help="frames per batch (83 atoms each)")
    parser.add_argument("--rounds", type=int, default=3, help="timed blocks per variant")
    parser.add_argument("--block-seconds", type=float, default=2.0)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per GPU variant")
    parser.add_argument("--cpu-steps", type=int, default=1, help="least steps per CPU block")
    parser.add_argument("--models", nargs="*", help="encoders (default: every predictive one)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/gpu.json")
    args = parser.parse_args(argv)
    from matsci_ray.models import model_names, model_spec

    torch.set_num_threads(os.cpu_count() or 1)
    names = args.models or [n for n in model_names() if model_spec(n).family == "predictive"]
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root, batches = lips_batches(Path(tmp), args.batch)
        for name in names:
            results[name] = measure_encoder(name, root, batches, args)
            print(name, json.dumps(results[name]), flush=True)
            write(args, results)  # after each encoder: a run cut short keeps what it measured
    print(markdown(summarise(results)))


def write(args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> None:
    record = {
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "results": results,
        "rows": summarise(results),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
