"""The per-worker training loop run by Ray Train's ``TorchTrainer`` (DDP: gloo on CPU, NCCL on GPU).

Each epoch: stream this worker's shard of the graph dataset, step the optimiser, evaluate on
this worker's validation shard (metrics all-reduced), write TensorBoard events and report
metrics with a checkpoint. Restarts (``FailureConfig``) and ``--resume`` start from the last
checkpoint's epoch with optimiser and scheduler state, and each epoch reads its data in the
order an uninterrupted run gives it (:mod:`matsci_ray.train.data_order`).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from matsci_ray.config import ExperimentConfig
from matsci_ray.data.mixing import MixedBatches, epoch_batches, mixture_weights
from matsci_ray.graphs.batching import rows_to_pyg_batch
from matsci_ray.potential import MatSciModel
from matsci_ray.train.checkpoint import (
    build_model,
    load_training_state,
    read_checkpoint,
    save_checkpoint,
)
from matsci_ray.train.data_order import announce, order_seed
from matsci_ray.train.metrics import MetricSums, task_losses
from matsci_ray.train.pcgrad import pcgrad_backward
from matsci_ray.train.schedule import Schedule
from matsci_ray.train.telemetry import HISTORY, Telemetry


def batch_targets(model: MatSciModel) -> list[str]:
    names: list[str] = []
    for task in model.tasks.values():
        names += task.columns
    return list(dict.fromkeys(names))


def _maybe_fail(config: ExperimentConfig, epoch: int, rank: int) -> None:
    """Testing hook: rank 0 dies (once per run directory) at ``run.fail_at_epoch``."""
    if config.run.fail_at_epoch != epoch or rank != 0:
        return
    marker = config.run.storage / config.name / f".failed-at-{epoch}"
    if not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        os._exit(1)


def collate(rows: dict[str, Any], targets: list[str], datasets: list[str]) -> Any:
    """PyG batch plus ``dataset_index`` (B,): which of ``datasets`` each structure came from,
    so a head scores only its own data set's structures."""
    batch = rows_to_pyg_batch(rows, targets)
    names = np.asarray(rows["dataset"]).astype(str)
    lookup = {name: k for k, name in enumerate(datasets)}
    batch.dataset_index = torch.as_tensor([lookup.get(n, -1) for n in names], dtype=torch.long)
    return batch


def evaluate(
    core: MatSciModel,
    shards: dict[str, Any],
    config: ExperimentConfig,
    device: torch.device,
    targets: list[str],
    rank: int,
) -> dict[str, float]:
    """Exact validation metrics: rank 0 scores every (unsplit) validation set and broadcasts
    them, so no row is dropped to even out worker shards."""
    metrics: list[dict[str, float] | None] = [None]
    if rank == 0:
        core.eval()
        sums = MetricSums(core, distributed=False)
        for shard in shards.values():
            for rows in shard.iter_batches(batch_size=config.data.batch_size, batch_format="numpy"):
                batch = collate(rows, targets, core.datasets).to(device)
                with torch.set_grad_enabled(core.needs_forces):
                    preds = core(batch)
                sums.update(preds, batch)
        metrics[0] = sums.compute()
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(metrics, src=0)
    return metrics[0] or {}


def train_batches(
    config: ExperimentConfig,
    shards: dict[str, Any],
    sizes: dict[str, int],
    world_size: int,
    epoch: int = 0,
    rank: int = 0,
    order_file: str | None = None,
) -> Iterator[dict[str, Any]]:
    """One epoch of row batches: a single data set streams directly; several are interleaved
    by the mixing schedule so that no data set starves.

    Each pass over a data set is ordered by ``(run seed, epoch, pass)`` alone: rank 0
    announces it in ``order_file`` for the split's coordinator, and the local shuffle buffer
    is seeded with it (and the rank), so a resumed or restarted run sees what an
    uninterrupted one sees."""
    buffer = config.data.shuffle_buffer or None

    def passes(name: str, shard: Any) -> Callable[[], Iterator[dict[str, Any]]]:
        counter = itertools.count()

        def start() -> Iterator[dict[str, Any]]:
            index = next(counter)
            if rank == 0 and order_file is not None:
                announce(order_file, name, epoch, index)
            return iter(
                shard.iter_batches(
                    batch_size=config.data.batch_size,
                    batch_format="numpy",
                    local_shuffle_buffer_size=buffer,
                    local_shuffle_seed=order_seed(config.run.seed, epoch, index, rank)
                    if buffer
                    else None,
                    prefetch_batches=2,
                )
            )

        return start

    if len(shards) == 1:
        return passes(*next(iter(shards.items())))()
    weights = mixture_weights(sizes, config.data.mix, config.data.mix_temperature)
    return iter(
        MixedBatches(
            {name: passes(name, shard) for name, shard in shards.items()},
            weights,
            config.data.batch_size,
            epoch_batches(sizes, config.data.batch_size, world_size),
        )
    )


class Stepper:
    """One optimiser step: losses added with weights (DDP), or combined by PCGrad."""

    def __init__(
        self,
        config: ExperimentConfig,
        core: MatSciModel,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
    ) -> None:
        self.config, self.core, self.model, self.optimizer = config, core, model, optimizer
        self.shared = list(core.encoder.parameters())
        self.specific = list(core.heads.parameters())
        self.steps = 0

    def __call__(self, losses: dict[str, torch.Tensor]) -> None:
        weights = self.config.loss.task_weights
        weighted = [weights.get(name, 1.0) * loss for name, loss in losses.items()]
        self.optimizer.zero_grad(set_to_none=True)
        if self.config.loss.combine == "pcgrad" and len(weighted) > 1:
            # identical seed on every worker: the same projection order, the same update
            generator = torch.Generator().manual_seed(self.config.run.seed + self.steps)
            pcgrad_backward(weighted, self.shared, self.specific, generator)
        else:
            torch.stack(weighted).sum().backward()
        if self.config.optim.grad_clip:
            nn.utils.clip_grad_norm_(self.core.parameters(), self.config.optim.grad_clip)
        self.optimizer.step()
        self.steps += 1


def _prepare(core: MatSciModel, config: ExperimentConfig) -> nn.Module:
    """DDP for additive losses; PCGrad all-reduces per-task gradients itself, so its model is
    not wrapped, and rank 0's initial weights are broadcast instead."""
    if config.loss.combine != "pcgrad":
        return ray.train.torch.prepare_model(core)
    model = ray.train.torch.prepare_model(core, parallel_strategy=None)
    if dist.is_available() and dist.is_initialized():
        for tensor in core.state_dict().values():
            dist.broadcast(tensor, src=0)
    return model


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    config = ExperimentConfig.model_validate(loop_config["experiment"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if config.run.threads_per_worker:
        torch.set_num_threads(config.run.threads_per_worker)
    torch.manual_seed(config.run.seed)
    device = ray.train.torch.get_device()

    core = build_model(config)
    core.fit_normalisation(loop_config["summaries"])
    optimizer = torch.optim.AdamW(
        core.parameters(), lr=config.optim.lr, weight_decay=config.optim.weight_decay
    )
    key, higher = primary_metric(config)
    scheduler = Schedule(optimizer, config.optim, loop_config["steps_per_epoch"], higher)
    start_epoch, best, stale = _restore(loop_config, config, core, optimizer, scheduler, rank)
    model = _prepare(core, config)
    train_shards = {d: ray.train.get_dataset_shard(f"train:{d}") for d in core.datasets}
    val_shards = {d: ray.train.get_dataset_shard(f"val:{d}") for d in core.datasets}
    sizes = {d: loop_config["summaries"][d]["records"] for d in core.datasets}
    targets = batch_targets(core)
    step = Stepper(config, core, model, optimizer)
    step.steps = scheduler.steps  # optimiser steps taken before a resume (PCGrad's seeds)
    telemetry = Telemetry(config, rank)
    order_file = loop_config.get("order_file")
    started = time.monotonic()
    last_report_s = 0.0

    for epoch in range(start_epoch, config.optim.epochs):
        _maybe_fail(config, epoch, rank)
        model.train()
        sums = MetricSums(core)
        epoch_start = wait = time.monotonic()
        waited, samples = 0.0, 0
        for rows in train_batches(config, train_shards, sizes, world, epoch, rank, order_file):
            batch = collate(rows, targets, core.datasets).to(device)
            waited += time.monotonic() - wait
            preds = model(batch)
            losses = task_losses(core, preds, batch, config.loss)
            step(losses)
            scheduler.step_batch()
            for name, loss in losses.items():
                sums.add_loss(name, float(loss.detach()), batch.num_graphs)
            sums.update(preds, batch)
            samples += batch.num_graphs
            wait = time.monotonic()
        elapsed = time.monotonic() - epoch_start
        metrics = sums.compute("train/")
        val_start = time.monotonic()
        metrics.update(
            {
                f"val/{k}": v
                for k, v in evaluate(core, val_shards, config, device, targets, rank).items()
            }
        )
        # where an epoch's wall time goes: training, validation, and (below) checkpointing
        metrics["time/train_s"] = elapsed
        metrics["time/val_s"] = time.monotonic() - val_start
        # plateau: the same metric on every rank (evaluate broadcasts it), the same cut
        scheduler.step_epoch(metrics.get(key, float("nan")))
        metrics.update(
            {
                "epoch": epoch + 1,
                "lr": scheduler.lr,  # what the next step uses: after this epoch's plateau cut
                "train/samples_per_s": samples * world / max(elapsed, 1e-9),
                "train/data_wait_fraction": waited / max(elapsed, 1e-9),
            }
        )
        best, stale = _early_stopping(config, metrics, best, stale)
        metrics["best_score"] = best
        metrics["time/report_s"] = last_report_s  # the previous epoch's checkpoint + report
        telemetry.log(metrics, epoch + 1)
        report_start = time.monotonic()
        _report(config, core, optimizer, scheduler, metrics, epoch + 1, best, stale, rank)
        last_report_s = time.monotonic() - report_start
        out_of_time = (
            config.optim.max_minutes is not None
            and time.monotonic() - started > 60 * config.optim.max_minutes
        )
        patience = config.optim.early_stopping_patience
        if out_of_time or (patience is not None and stale >= patience):
            break
    telemetry.close()


def _restore(
    loop_config: dict[str, Any],
    config: ExperimentConfig,
    core: MatSciModel,
    optimizer: torch.optim.Optimizer,
    scheduler: Schedule,
    rank: int,
) -> tuple[int, float | None, int]:
    """Load the checkpoint this worker group starts from; ``(start epoch, best, stale)``.

    Ray Train V2 hands the loop this run's latest checkpoint (after a ``FailureConfig``
    restart, or when a run directory of the same name and storage already holds one), and
    ``--resume`` names another (``loop_config["resume_from"]``). The later of the two wins,
    Ray's on a tie: a restart after a resume continues from the restart's checkpoint."""
    resume = loop_config.get("resume_from")
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and resume is None:
        return 0, None, 0
    with contextlib.ExitStack() as stack:
        candidates = []
        if checkpoint is not None:
            candidates.append(Path(stack.enter_context(checkpoint.as_directory())))
        if resume is not None:
            candidates.append(Path(resume))
        states = [read_checkpoint(path) for path in candidates]  # each read once
        latest = max(range(len(states)), key=lambda i: int(states[i]["epoch"]))  # Ray's on a tie
        restored = load_training_state(states[latest], core, optimizer, scheduler)
    if rank == 0 and resume is not None and candidates[latest] == Path(resume):
        _carry_history(config, Path(resume), restored[0])
    return restored


def _carry_history(config: ExperimentConfig, checkpoint: Path, epoch: int) -> None:
    """A run resumed under a new name starts its ``history.jsonl`` with the source run's
    epochs up to the checkpoint's, so its learning curve holds every epoch once."""
    source = checkpoint.parent / HISTORY
    target = config.run.storage / config.name / HISTORY
    if target.exists() or not source.is_file():
        return
    rows = [line for line in source.read_text().splitlines() if line.strip()]
    kept = [line for line in rows if json.loads(line).get("epoch", 0) <= epoch]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("".join(f"{line}\n" for line in kept))


def primary_metric(config: ExperimentConfig) -> tuple[str, bool]:
    """``(metric key, higher is better)`` of the first task: what early stopping watches."""
    from matsci_ray.tasks.registry import TASKS

    task = TASKS[config.tasks[0]]
    return f"val/{task.metric_name}", task.higher_is_better


def _early_stopping(
    config: ExperimentConfig, metrics: dict[str, float], best: float | None, stale: int
) -> tuple[float | None, int]:
    key, higher = primary_metric(config)
    score = metrics.get(key, float("nan"))
    if math.isnan(score):
        return best, stale
    if best is None or (score > best if higher else score < best):
        return score, 0
    return best, stale + 1


def _report(
    config: ExperimentConfig,
    core: MatSciModel,
    optimizer: torch.optim.Optimizer,
    scheduler: Schedule,
    metrics: dict[str, float],
    epoch: int,
    best: float | None,
    stale: int,
    rank: int,
) -> None:
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if rank == 0:
            save_checkpoint(
                Path(directory), core, config, optimizer, scheduler, epoch, best, stale, metrics
            )
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(metrics, checkpoint=checkpoint)
