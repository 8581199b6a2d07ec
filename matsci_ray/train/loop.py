"""The per-worker training loop run by Ray Train's ``TorchTrainer`` (DDP: gloo on CPU, NCCL on GPU).

Each epoch (:func:`run_epoch`): stream this worker's shard of the graph dataset, step the
optimiser, score this worker's shard of the validation sets (:func:`validate`), then write
TensorBoard events and report metrics with a checkpoint (:func:`report`). Restarts
(``FailureConfig``), elastic resizes and ``--resume`` start from the last checkpoint with
optimiser and scheduler state, and each epoch reads its data in the order an uninterrupted
run gives it (:mod:`matsci_ray.train.data_order`). A worker's state, how it starts and how
the global batch is shared among the workers: :mod:`matsci_ray.train.worker`.

A checkpoint written mid-epoch (``run.checkpoint_every_steps``) records the steps already
taken in its epoch; the run that continues from it re-reads that epoch in the same seeded
order and skips as many batches (of the current world size) as were trained, so it trains
the epoch's remaining steps and the schedule goes on at the checkpoint's step. With one
worker the rows are the very ones an uninterrupted run would train; with several, Ray
Data's split deals rows to workers as they ask, so the rows skipped are as many as were
trained, not necessarily the same ones. ``optim.max_steps_per_epoch`` ends an epoch after
that many steps on every worker at once (:func:`~matsci_ray.train.batches.remaining_steps`).
"""

from __future__ import annotations

import itertools
import logging
import math
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from matsci_ray.graphs.batching import AtomPacker
from matsci_ray.graphs.collate import batch_targets, collate
from matsci_ray.potential import Predictions
from matsci_ray.tasks.registry import primary_metric
from matsci_ray.train import faults
from matsci_ray.train.batches import remaining_steps, train_batches
from matsci_ray.train.checkpoint import save_checkpoint
from matsci_ray.train.metrics import MetricSums, collated, score_batches, task_losses
from matsci_ray.train.pcgrad import pcgrad_backward
from matsci_ray.train.precision import training_autocast
from matsci_ray.train.telemetry import Telemetry
from matsci_ray.train.worker import EpochData, TrainState, start

logger = logging.getLogger(__name__)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Epochs from the resumed one (or the first) to ``optim.epochs``, or until out of time
    or patience; ``loop_config`` is what :func:`~matsci_ray.train.trainer.build_trainer` sends."""
    state = start(loop_config)
    data = EpochData.from_loop_config(state.config, state.core.datasets, loop_config)
    telemetry = Telemetry(state.config, state.rank)
    started = time.monotonic()
    while state.epoch < state.config.optim.epochs:
        faults.maybe_fail(state.config, state.epoch, state.rank)
        metrics = run_epoch(state, data)
        telemetry.log(metrics, state.epoch)
        report(state, metrics)
        faults.hold_while_shrunk(state.config, state.world)
        if should_stop(state, started):
            break
    telemetry.close()


def run_epoch(state: TrainState, data: EpochData) -> dict[str, float]:
    """Train one epoch and validate; the epoch's metrics, after the plateau schedule and early
    stopping have seen its primary metric."""
    metrics = train_epoch(state, data)
    val_start = time.monotonic()
    metrics.update(validate(state, data))
    metrics["time/val_s"] = time.monotonic() - val_start
    state.epoch += 1
    key, _ = primary_metric(state.config.tasks)
    # plateau: the same metric on every rank (validate all-reduces it), the same cut
    state.scheduler.step_epoch(metrics.get(key, float("nan")))
    early_stopping(state, metrics.get(key, float("nan")))
    metrics["epoch"] = state.epoch
    metrics["step"] = state.scheduler.steps
    metrics["workers"] = state.world
    metrics["lr"] = state.scheduler.lr  # what the next step uses: after this epoch's plateau cut
    metrics["best_score"] = state.best
    metrics["time/report_s"] = state.report_s  # the previous epoch's checkpoint + report
    return metrics


def train_epoch(state: TrainState, data: EpochData) -> dict[str, float]:
    """One pass over this worker's training batches: the ``train/`` losses and metrics (of
    the batches as they were trained on), throughput and where the time went."""
    core, config = state.core, state.config
    targets = batch_targets(core.tasks.values())
    state.model.train()
    sums = MetricSums(core, device=state.device)
    epoch_start = wait = time.monotonic()
    waited, samples, first_batch = 0.0, 0, None
    packer = AtomPacker(state.atom_budget) if state.atom_budget is not None else None
    batches = train_batches(
        config,
        data.train,
        data.sizes,
        state.batch_size,
        state.world,
        state.epoch,
        state.rank,
        data.order_file,
        packer,
    )
    # steps_in_epoch > 0: resumed from a mid-epoch checkpoint
    skip = state.scheduler.steps_in_epoch
    steps = itertools.islice(_steps(batches, state, skip), remaining_steps(config, skip))
    for rows, counts in steps:
        batch = collate(rows, targets, core.datasets).to(state.device)
        waited += time.monotonic() - wait
        first_batch = waited if first_batch is None else first_batch
        preds, losses = _train_step(state, batch, counts)
        if counts:
            for name, loss in losses.items():
                sums.add_loss(name, float(loss.detach()), batch.num_graphs)
            sums.update(preds, batch)
            samples += batch.num_graphs
        _maybe_checkpoint_step(state)
        wait = time.monotonic()
    elapsed = time.monotonic() - epoch_start
    metrics = {
        **sums.compute("train/"),
        "time/train_s": elapsed,
        "train/samples_per_s": samples * state.world / max(elapsed, 1e-9),
        "train/data_wait_fraction": waited / max(elapsed, 1e-9),
        # the stream's start-up (file reads, first graphs), included in the fraction above
        "time/first_batch_s": first_batch or 0.0,
    }
    if packer is not None:
        metrics["train/oversized_structures"] = packer.oversized
        _warn_oversized(state, packer.oversized)
    return metrics


def _steps(
    batches: Iterator[dict[str, Any]], state: TrainState, skip: int
) -> Iterator[tuple[dict[str, Any], bool]]:
    """The epoch's steps after the first ``skip`` (already trained): ``(rows, counts)``.

    Row batches come in equal numbers on every worker. Atom batches do not: the workers'
    shards hold as many rows but not as many atoms. DDP (and PCGrad's all-reduce) needs every
    worker in every step, so before each step the workers all-reduce whether any still has a
    batch, and the epoch ends when none has. A worker that has run out takes the remaining
    steps on its last batch with ``counts`` False: a zero-weighted loss, which adds nothing
    to the averaged gradient and is left out of the epoch's metrics."""
    iterator = iter(batches)
    last = None
    for skipped in itertools.islice(iterator, skip):
        last = skipped
    lockstep = state.atom_budget is not None and state.world > 1 and dist.is_initialized()
    while True:
        rows = next(iterator, None)
        more = _any_worker(rows is not None, state) if lockstep else rows is not None
        if not more:
            return
        if rows is not None:
            last = rows
            yield rows, True
        elif last is None:
            raise RuntimeError(f"worker {state.rank} has no training rows in this epoch")
        else:
            yield last, False


def _any_worker(flag: bool, state: TrainState) -> bool:
    """Whether ``flag`` holds on some worker (an all-reduce: every worker must call it)."""
    value = torch.tensor([int(flag)], device=state.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _train_step(
    state: TrainState, batch: Any, counts: bool
) -> tuple[Predictions, dict[str, torch.Tensor]]:
    """Forward (under ``run.precision``), losses and one optimiser step; a step that does not
    ``count`` (:func:`_steps`) is taken with the losses weighted zero."""
    with training_autocast(state.config, state.device):
        preds = state.model(batch)
    losses = task_losses(state.core, preds, batch, state.config.loss)
    _optimiser_step(state, losses if counts else {k: 0.0 * v for k, v in losses.items()})
    return preds, losses


def _warn_oversized(state: TrainState, oversized: int) -> None:
    if oversized and state.rank == 0:
        logger.warning(
            "epoch %d: %d structure(s) of more than %d atoms (data.max_atoms_per_batch's "
            "share per worker) trained alone, each a batch of its own",
            state.epoch + 1,
            oversized,
            state.atom_budget,
        )


def validate(state: TrainState, data: EpochData) -> dict[str, float]:
    """Exact ``val/`` metrics: each worker scores its shard of every validation set (split
    unevenly, so no row is dropped; a shard may be empty) and the sums and counts are
    all-reduced, the same figures on every rank. A small shard is streamed and collated
    once and kept (:mod:`~matsci_ray.train.kept_batches`)."""
    config = state.config

    def stream() -> Iterator[Any]:
        rows: Iterator[dict[str, Any]] = itertools.chain.from_iterable(
            shard.iter_batches(batch_size=config.data.batch_size, batch_format="numpy")
            for shard in data.val.values()
        )
        if config.data.max_atoms_per_batch is not None:  # the memory bound at any world size
            rows = AtomPacker(config.data.max_atoms_per_batch)(rows)
        return collated(state.evaluated, rows, state.device)

    # fp32, and the weights' average under optim.ema_decay: what predicts from the checkpoint
    metrics = score_batches(state.evaluated, data.kept_val(stream), state.device, True)
    return {f"val/{k}": v for k, v in metrics.items()}


def _maybe_checkpoint_step(state: TrainState) -> None:
    """Every ``run.checkpoint_every_steps`` optimiser steps (on every rank at once: the step
    counts are the same), report a mid-epoch checkpoint. Its metrics hold the primary
    metric as NaN, which Ray ranks below every scored checkpoint."""
    every, steps = state.config.run.checkpoint_every_steps, state.scheduler.steps
    if not every or steps % every:
        return
    key, _ = primary_metric(state.config.tasks)
    metrics = {"epoch": state.epoch, "step": steps, "workers": state.world, key: math.nan}
    report(state, {**metrics, "lr": state.scheduler.lr})
    faults.maybe_fail_at_step(state.config, steps, state.rank)


def report(state: TrainState, metrics: dict[str, float]) -> None:
    """Report metrics to Ray Train, with rank 0's checkpoint (at an epoch's end, or mid-epoch
    with the steps taken in the epoch: the schedule's state holds them)."""
    report_start = time.monotonic()
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if state.rank == 0:
            save_checkpoint(
                Path(directory),
                state.evaluated,  # the weights that are validated and predict
                state.config,
                state.optimizer,
                state.scheduler,
                state.epoch,
                state.best,
                state.stale,
                metrics,
                extra={"ema": state.ema.state_dict(state.core) if state.ema else None},
            )
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(metrics, checkpoint=checkpoint)
    state.report_s = time.monotonic() - report_start


def _optimiser_step(state: TrainState, losses: dict[str, torch.Tensor]) -> None:
    """One optimiser step and the schedule's: losses added with weights (DDP), or combined by
    PCGrad."""
    config = state.config
    weights = config.loss.task_weights
    weighted = [weights.get(name, 1.0) * loss for name, loss in losses.items()]
    state.optimizer.zero_grad(set_to_none=True)
    if config.loss.combine == "pcgrad" and len(weighted) > 1:
        # identical seed on every worker: the same projection order, the same update
        generator = torch.Generator().manual_seed(config.run.seed + state.scheduler.steps)
        shared, specific = state.core.encoder.parameters(), state.core.heads.parameters()
        pcgrad_backward(weighted, list(shared), list(specific), generator)
    else:
        torch.stack(weighted).sum().backward()
    if config.optim.grad_clip:
        nn.utils.clip_grad_norm_(state.core.parameters(), config.optim.grad_clip)
    state.optimizer.step()
    state.scheduler.step_batch()
    if state.ema is not None:  # DDP's replicas are equal after the step: no all-reduce
        state.ema.update(state.core)


def early_stopping(state: TrainState, value: float) -> None:
    """Track the best primary metric and the epochs since it improved (a NaN is not counted)."""
    if math.isnan(value):
        return
    _, higher = primary_metric(state.config.tasks)
    if state.best is None or (value > state.best if higher else value < state.best):
        state.best, state.stale = value, 0
    else:
        state.stale += 1


def should_stop(state: TrainState, started: float) -> bool:
    """Out of time (``optim.max_minutes``) or of patience (``early_stopping_patience``).

    Each worker reads its own clock from its own start, so near the limit one may be out of
    time and another not: the workers stop when any of them is, or the one that went on would
    wait for ever in the next epoch's data split and all-reduces for the ones that left.
    Patience needs no such vote: it counts the all-reduced metric, the same on every rank."""
    optim = state.config.optim
    out_of_time = (
        optim.max_minutes is not None and time.monotonic() - started > 60 * optim.max_minutes
    )
    if optim.max_minutes is not None and state.world > 1 and dist.is_initialized():
        out_of_time = _any_worker(out_of_time, state)
    patience = optim.early_stopping_patience
    return out_of_time or (patience is not None and state.stale >= patience)
