"""Training a generative model on Ray Train (DDP), from the same data layer as every run.

:func:`build_trainer` reads the config's one data set (its first task's) through
:func:`matsci_ray.train.trainer.graph_dataset` (radius graphs built in the Ray Data stream,
cached when small), and :func:`train_loop_per_worker` trains :class:`Objective` with the
predictive loop's batching, schedule, restarts, telemetry and early stopping. The task's
target is what the latent's property predictor learns; validation reports the objective's
terms (``val/loss`` ranks checkpoints) and that property's error under the task's own metric
key, so studies and sweeps (which follow the task's metric) run on a generative config too.
"""

from __future__ import annotations

import itertools
import tempfile
import time
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train.torch import TorchTrainer
from torch import nn

from matsci_ray.config import ExperimentConfig, dump_config
from matsci_ray.data.mixing import epoch_batches
from matsci_ray.errors import ConfigError
from matsci_ray.generative import checkpoint
from matsci_ray.generative.data import normalisation_stats
from matsci_ray.generative.objective import TERMS, Objective
from matsci_ray.graphs.collate import collate
from matsci_ray.storage import Location, location, ray_storage, resolve
from matsci_ray.tasks.registry import TASKS, metric_key
from matsci_ray.train import loop, trainer
from matsci_ray.train.batches import remaining_steps, train_batches
from matsci_ray.train.checkpoint import check_resume
from matsci_ray.train.entry import ShardedValidation, generative_loop_per_worker
from matsci_ray.train.preflight import prepare_run
from matsci_ray.train.resume import restore
from matsci_ray.train.schedule import Schedule
from matsci_ray.train.telemetry import Telemetry
from matsci_ray.train.worker import TrainState, worker_batch_size

VAL_LOSS = "val/loss"


def property_task(config: ExperimentConfig) -> str:
    """The config's one task: its data set is trained on, its target is the property the
    latent predicts (a regression target)."""
    if len(config.tasks) != 1:
        raise ConfigError(f"tasks: a generative model takes one task, got {config.tasks}")
    task = TASKS[config.tasks[0]]
    if task.kind != "regression":
        raise ConfigError(f"tasks: {task.name} is {task.kind}; CDVAE predicts a regression target")
    return task.name


def build_trainer(
    config: ExperimentConfig,
    resume_from: Location | str | None = None,
    callbacks: list[Any] | None = None,
) -> TorchTrainer:
    """The Ray Train trainer of a generative ``config`` (``train.trainer.build_trainer``'s
    arguments)."""
    task = TASKS[property_task(config)]
    if resume_from is not None:
        resume_from = resolve(location(resume_from))
        check_resume(resume_from, config)
    callbacks = prepare_run(config, callbacks)
    ray.data.DataContext.get_current().enable_progress_bars = False
    trainer.set_controller_env(config)
    splits = trainer.manifest_splits(config)[task.dataset]
    if "train" not in splits:
        raise ConfigError(f"{config.data.root}/{task.dataset}: no train split")
    limit = config.data.max_train_samples
    cache = trainer.should_cache(config, splits["train"])
    train = trainer.graph_dataset(config, task.dataset, "train", limit, shuffle_files=not cache)
    if cache:
        train = trainer.cached_epochs(
            train, config.run.seed, trainer.epoch_order(config, task.dataset)
        )
    val = trainer.graph_dataset(config, task.dataset, config.data.val_split)
    size = min(splits["train"]["records"], limit or splits["train"]["records"])
    return TorchTrainer(
        generative_loop_per_worker,
        train_loop_config={
            "experiment": dump_config(config),
            "stats": normalisation_stats(config.data.root, task.dataset, task.target),
            "records": size,
            "steps_per_epoch": epoch_batches(
                {task.dataset: size}, config.data.batch_size, config.run.max_workers
            ),
            "resume_from": str(resume_from) if resume_from else None,
            "order_file": trainer.order_file(config),
        },
        scaling_config=trainer.scaling_config(config),
        run_config=ray.train.RunConfig(
            name=config.name,
            **ray_storage(config.run.storage),
            failure_config=ray.train.FailureConfig(max_failures=config.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute=VAL_LOSS, checkpoint_score_order="min"
            ),
            callbacks=callbacks,
        ),
        datasets={f"train:{task.dataset}": train, f"val:{task.dataset}": val},
        dataset_config=ShardedValidation(config.data.preserve_order),
    )


def start(loop_config: dict[str, Any]) -> TrainState:
    """This worker's model, objective (DDP-wrapped), optimiser and schedule, restored from the
    checkpoint it continues if any (the predictive loop's rules)."""
    config = ExperimentConfig.model_validate(loop_config["experiment"])
    ctx = ray.train.get_context()
    if config.run.threads_per_worker:
        torch.set_num_threads(config.run.threads_per_worker)
    torch.manual_seed(config.run.seed + ctx.get_world_rank())  # each rank its own noise
    model = checkpoint.build(config)
    model.fit_normalisation(loop_config["stats"])
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.optim.lr, weight_decay=config.optim.weight_decay
    )
    world = ctx.get_world_size()
    state = TrainState(
        config=config,
        core=model,  # type: ignore[arg-type]  # the loop's helpers only use nn.Module's API
        model=model,
        optimizer=optimizer,
        scheduler=Schedule(optimizer, config.optim, loop_config["steps_per_epoch"], False),
        rank=ctx.get_world_rank(),
        world=world,
        device=ray.train.torch.get_device(),
        batch_size=worker_batch_size(config, world),
    )
    restore(state, loop_config)
    objective = Objective(model, TASKS[config.tasks[0]].target)
    state.model = ray.train.torch.prepare_model(objective)
    return state


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    state = start(loop_config)
    dataset = TASKS[state.config.tasks[0]].dataset
    shards = {dataset: ray.train.get_dataset_shard(f"train:{dataset}")}
    val = ray.train.get_dataset_shard(f"val:{dataset}")
    telemetry = Telemetry(state.config, state.rank)
    started = time.monotonic()
    while state.epoch < state.config.optim.epochs:
        metrics = train_epoch(state, shards, loop_config)
        metrics.update(validate(state, val))
        state.epoch += 1
        state.scheduler.step_epoch(metrics[VAL_LOSS])
        loop.early_stopping(state, metrics[VAL_LOSS])
        metrics.update(epoch=state.epoch, step=state.scheduler.steps, lr=state.scheduler.lr)
        telemetry.log(metrics, state.epoch)
        report(state, metrics)
        if loop.should_stop(state, started):
            break
    telemetry.close()


def train_epoch(
    state: TrainState, shards: dict[str, Any], loop_config: dict[str, Any]
) -> dict[str, float]:
    config, dataset = state.config, next(iter(shards))
    target = TASKS[config.tasks[0]].target
    state.model.train()
    sums: dict[str, float] = {}
    count, epoch_start = 0, time.monotonic()
    batches = train_batches(
        config,
        shards,
        {dataset: loop_config["records"]},
        state.batch_size,
        state.world,
        state.epoch,
        state.rank,
        loop_config.get("order_file"),
    )
    skip = state.scheduler.steps_in_epoch  # > 0: resumed from a mid-epoch checkpoint
    steps = itertools.islice(batches, skip, None)
    for rows in itertools.islice(steps, remaining_steps(config, skip)):
        batch = collate(rows, [target], [dataset]).to(state.device)
        losses = state.model(batch)
        state.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        if config.optim.grad_clip:
            nn.utils.clip_grad_norm_(state.core.parameters(), config.optim.grad_clip)
        state.optimizer.step()
        state.scheduler.step_batch()
        _add(sums, losses, batch.num_graphs)
        count += batch.num_graphs
    elapsed = time.monotonic() - epoch_start
    metrics = {f"train/{k}": v / max(count, 1) for k, v in sums.items()}
    metrics["time/train_s"] = elapsed
    metrics["train/samples_per_s"] = count * state.world / max(elapsed, 1e-9)
    return metrics


@torch.no_grad()
def validate(state: TrainState, shard: Any) -> dict[str, float]:
    """The objective's terms and the property's squared error, per structure, all-reduced
    over the workers (each scores its own shard, which may be empty)."""
    config, model = state.config, state.core
    task = TASKS[config.tasks[0]]
    objective = Objective(model, task.target)  # not the DDP wrapper: no collective per batch
    objective.eval()
    # the same keys on every rank (a shard may be empty): all-reduce sends one vector
    sums = dict.fromkeys([*TERMS, "property_se", "property_n"], 0.0)
    count = 0
    for rows in shard.iter_batches(batch_size=config.data.batch_size, batch_format="numpy"):
        batch = collate(rows, [task.target], [task.dataset]).to(state.device)
        _add(sums, objective(batch), batch.num_graphs)
        count += batch.num_graphs
        _, mu, _ = model.encode(batch)
        mask = getattr(batch, f"{task.target}_mask")
        error = (model.property_value(mu) - getattr(batch, task.target)).pow(2)
        sums["property_se"] += float((error * mask).sum())
        sums["property_n"] += float(mask.sum())
    totals = _all_reduce({**sums, "count": float(count)}, state.device)
    count = max(totals.pop("count"), 1.0)
    se, n = totals.pop("property_se"), totals.pop("property_n")
    metrics = {f"val/{k}": v / count for k, v in totals.items()}
    metrics[metric_key(task.name)] = se / n if n else float("nan")
    return metrics


def _add(sums: dict[str, float], losses: dict[str, torch.Tensor], weight: int) -> None:
    for name, value in losses.items():
        sums[name] = sums.get(name, 0.0) + float(value.detach()) * weight


def _all_reduce(sums: dict[str, float], device: torch.device) -> dict[str, float]:
    if not (dist.is_available() and dist.is_initialized()):
        return sums
    keys = sorted(sums)
    values = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    return dict(zip(keys, values.tolist(), strict=True))


def report(state: TrainState, metrics: dict[str, float]) -> None:
    """Metrics to Ray Train, with rank 0's generative checkpoint."""
    with tempfile.TemporaryDirectory() as directory:
        saved = None
        if state.rank == 0:
            checkpoint.save(
                Path(directory),
                state.core,
                state.config,
                optimizer=state.optimizer,  # type: ignore[arg-type]
                scheduler=state.scheduler,
                epoch=state.epoch,
                best=state.best,
                stale=state.stale,
                metrics=metrics,
            )
            saved = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(metrics, checkpoint=saved)
