"""What one training worker carries from epoch to epoch, and how it starts: model, optimiser,
schedule and moving average, from the checkpoint it resumes if any.

The global batch, the structures per optimiser step, is ``data.batch_size`` x the largest
world size (``run.num_workers``, or MAX of ``[MIN, MAX]``); a group of ``w`` workers gives
each worker ``ceil(global / w)`` structures per step (:func:`worker_batch_size`), so the
steps per epoch, the learning-rate schedule and the data seen per step do not depend on how
many workers there are (the global batch rounds up to a multiple of ``w`` when ``w`` does
not divide it: at most ``w - 1`` structures more). DDP averages the workers' gradients, each
the mean over its equal share, and PCGrad all-reduces per-task gradients the same way.

With ``data.max_atoms_per_batch`` (N) a step is one batch of at most ``ceil(N x MAX / w)``
atoms on each of ``w`` workers (:func:`worker_atom_budget`; a larger structure alone), so a
step sees about N x MAX atoms at any world size, as a step of structures sees
``data.batch_size`` x MAX structures. Shards pack into unequal numbers of such batches, so
the workers step in lockstep until all are out (``matsci_ray.train.loop._steps``), and the
schedule plans with the epoch's atoms (:func:`planned_steps`).

Under ``optim.ema_decay`` the weights' moving average (:mod:`matsci_ray.train.ema`) is
updated after every step, validated and checkpointed as the model; the checkpoint also holds
the trained weights and the average's state, so any resume continues both exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from matsci_ray.config import ExperimentConfig
from matsci_ray.potential import MatSciModel
from matsci_ray.tasks.registry import primary_metric
from matsci_ray.train.ema import ExponentialMovingAverage
from matsci_ray.train.kept_batches import KeptBatches
from matsci_ray.train.precision import maybe_compile, set_matmul_precision
from matsci_ray.train.resume import restore
from matsci_ray.train.schedule import Schedule


@dataclass
class TrainState:
    """What one worker carries from epoch to epoch; a checkpoint holds all of it but the
    placement (rank, world, device) and the last report's duration."""

    config: ExperimentConfig
    core: MatSciModel  # the model itself: what is checkpointed and validated
    model: nn.Module  # what trains: ``core`` wrapped for DDP (or not, under PCGrad)
    optimizer: torch.optim.Optimizer
    scheduler: Schedule  # its step count is the optimiser's, on every rank
    rank: int
    world: int
    device: torch.device
    batch_size: int  # structures per step on this worker, its share of the global batch
    atom_budget: int | None = None  # data.max_atoms_per_batch: atoms per step on this worker
    ema: ExponentialMovingAverage[MatSciModel] | None = None  # optim.ema_decay's average
    epoch: int = 0  # epochs trained
    best: float | None = None  # the best primary metric so far
    stale: int = 0  # epochs since it improved
    report_s: float = 0.0  # how long the last epoch's checkpoint and report took

    @property
    def evaluated(self) -> MatSciModel:
        """What is validated and checkpointed as the model: the weights' average under
        ``optim.ema_decay``, else the trained weights."""
        return self.ema.averaged if self.ema is not None else self.core


@dataclass
class EpochData:
    """Per data set: this worker's training and validation shards, and the training
    records behind the mixing weights."""

    train: dict[str, Any]
    val: dict[str, Any]
    sizes: dict[str, int]
    order_file: str | None  # where rank 0 announces each training pass
    kept_val: KeptBatches  # the validation batches, once scored, if small enough to keep

    @classmethod
    def from_loop_config(
        cls, config: ExperimentConfig, datasets: list[str], loop_config: dict[str, Any]
    ) -> EpochData:
        return cls(
            train={d: ray.train.get_dataset_shard(f"train:{d}") for d in datasets},
            val={d: ray.train.get_dataset_shard(f"val:{d}") for d in datasets},
            sizes={d: loop_config["summaries"][d]["records"] for d in datasets},
            order_file=loop_config.get("order_file"),
            kept_val=KeptBatches(config.data.val_keep_max_atoms),
        )


def start(loop_config: dict[str, Any]) -> TrainState:
    """This worker's model, optimiser and schedule, from the checkpoint it resumes if any."""
    config = ExperimentConfig.model_validate(loop_config["experiment"])
    ctx = ray.train.get_context()
    if config.run.threads_per_worker:
        torch.set_num_threads(config.run.threads_per_worker)
    set_matmul_precision(config)
    torch.manual_seed(config.run.seed)
    core = MatSciModel.from_config(config)
    core.fit_normalisation(loop_config["summaries"])
    optimizer = torch.optim.AdamW(
        core.parameters(), lr=config.optim.lr, weight_decay=config.optim.weight_decay
    )
    _, higher = primary_metric(config.tasks)
    scheduler = Schedule(optimizer, config.optim, planned_steps(config, loop_config), higher)
    world = ctx.get_world_size()
    state = TrainState(
        config=config,
        core=core,
        model=core,
        optimizer=optimizer,
        scheduler=scheduler,
        rank=ctx.get_world_rank(),
        world=world,
        device=ray.train.torch.get_device(),
        batch_size=worker_batch_size(config, world),
        atom_budget=worker_atom_budget(config, world),
    )
    restored = restore(state, loop_config)
    state.ema = _moving_average(state, restored)  # before compiling: it copies the model
    maybe_compile(core, config, state.device)
    state.model = _prepare(core, config)
    return state


def worker_batch_size(config: ExperimentConfig, world: int) -> int:
    """Each of ``world`` workers' share of the global batch (``data.batch_size`` x the
    largest world size), rounded up."""
    return -(-config.data.batch_size * config.run.max_workers // world)


def worker_atom_budget(config: ExperimentConfig, world: int) -> int | None:
    """With atom batches, each of ``world`` workers' atoms per step: its share of the global
    atom batch (``data.max_atoms_per_batch`` x the largest world size), rounded up, as
    :func:`worker_batch_size` shares structures. A step is then one batch of at most this
    many atoms on every worker (one structure alone if it is larger)."""
    limit = config.data.max_atoms_per_batch
    return None if limit is None else -(-limit * config.run.max_workers // world)


def planned_steps(config: ExperimentConfig, loop_config: dict[str, Any]) -> int:
    """Optimiser steps per epoch the lr schedule plans for: the driver's count of global
    batches, or with atom batches the epoch's atoms over the global atom batch's expected
    fill (a greedily packed batch closes about half a mean structure short). Packing order
    moves the true count a little either way; past the plan the lr is held (Schedule)."""
    limit = config.data.max_atoms_per_batch
    if limit is None:
        return int(loop_config["steps_per_epoch"])
    summaries = loop_config["summaries"].values()
    records = sum(int(s["records"]) for s in summaries)
    atoms = sum(int(s["records"]) * _mean_atoms(s) for s in summaries)
    fill = max(limit - 0.5 * atoms / max(records, 1), 1.0)
    return max(math.ceil(atoms / (fill * config.run.max_workers)), 1)


def _mean_atoms(summary: dict[str, Any]) -> float:
    return float(summary.get("atoms_per_record", {}).get("mean", 0.0))


def _moving_average(
    state: TrainState, restored: dict[str, Any] | None
) -> ExponentialMovingAverage[MatSciModel] | None:
    """``optim.ema_decay``'s average on this worker's device: the checkpoint's, continued,
    when the run resumes one that kept an average, else started from the weights the run
    starts with."""
    decay = state.config.optim.ema_decay
    if decay is None:
        return None
    ema = ExponentialMovingAverage(state.core, decay)
    saved = (restored or {}).get("ema")
    if saved is not None:
        assert restored is not None
        ema.load(restored["model"], saved["updates"])
    ema.averaged.to(state.device)
    return ema


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
