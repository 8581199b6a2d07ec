"""Learning-rate schedules (``optim.scheduler``) and which checkpoints a run keeps.

The schedules are torch's schedulers: cosine and warm-up give the values of the hand-written
``LambdaLR`` they replaced, plateau cuts the lr on the primary validation metric, and every
schedule continues through a checkpoint. A run keeps its best checkpoint and its latest.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from matsci_ray.config import ExperimentConfig, OptimConfig, load_config
from matsci_ray.errors import ConfigError
from matsci_ray.potential import MatSciModel
from matsci_ray.train.checkpoint import (
    checkpoint_epoch,
    load_training_state,
    read_checkpoint,
    save_checkpoint,
)
from matsci_ray.train.schedule import Schedule
from tests.samples import TINY_EGNN

LR = 3e-3


def _old_factor(optim: OptimConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """The ``LambdaLR`` factor ``loop._scheduler`` used before torch's schedulers."""
    total = max(optim.epochs * steps_per_epoch, 1)
    warmup = optim.warmup_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if optim.scheduler == "cosine":
            progress = min((step - warmup) / max(total - warmup, 1), 1.0)
            return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return factor


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=LR)


def _step(optimizer: torch.optim.Optimizer, schedule: Schedule) -> None:
    """One real optimiser step (a zero gradient), then the schedule's, as the loop does."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    schedule.step_batch()


@pytest.mark.parametrize(
    ("scheduler", "warmup"),
    [("cosine", 0), ("cosine", 1), ("cosine", 5), ("cosine", 40), ("none", 5), ("plateau", 5)],
)
def test_per_step_values_are_the_old_lambdas(scheduler: str, warmup: int) -> None:
    """Every step's lr, past the planned end too (held at 0.02 lr for cosine: the
    steps-per-epoch estimate can undercount), and warm-up longer than the run (40 of 21)."""
    optim = OptimConfig(lr=LR, epochs=3, scheduler=scheduler, warmup_steps=warmup)
    optimizer = _optimizer()
    schedule = Schedule(optimizer, optim, steps_per_epoch=7, higher_is_better=False)
    factor = _old_factor(optim, 7)
    for step in range(30):
        assert schedule.lr == pytest.approx(LR * factor(step), rel=1e-12), step
        _step(optimizer, schedule)
    if scheduler == "cosine" and warmup < 21:
        assert schedule.lr == pytest.approx(0.02 * LR, rel=1e-12)


def _plateau(patience: int, warmup: int = 0, higher: bool = False) -> tuple:
    optim = OptimConfig(
        lr=LR,
        epochs=20,
        scheduler="plateau",
        warmup_steps=warmup,
        plateau_factor=0.5,
        plateau_patience=patience,
    )
    optimizer = _optimizer()
    return optimizer, Schedule(optimizer, optim, steps_per_epoch=2, higher_is_better=higher)


def _epochs(optimizer: torch.optim.Optimizer, schedule: Schedule, scores: list[float]) -> list:
    """The lr after each epoch of 2 steps and a validation ``score``."""
    lrs = []
    for score in scores:
        _step(optimizer, schedule)
        _step(optimizer, schedule)
        schedule.step_epoch(score)
        lrs.append(schedule.lr)
    return lrs


def test_plateau_cuts_after_patience_epochs_without_gain() -> None:
    """Patience 2: the lr halves at the end of the 2nd epoch in a row without gain (as
    early stopping counts them: an equal score is no gain), the count restarts after a cut
    and after any gain; a higher-is-better metric is watched the other way; the lr never
    goes below 0.02 lr."""
    optimizer, schedule = _plateau(patience=2)
    lrs = _epochs(optimizer, schedule, [1.0, 0.9, 0.95, 0.85, 0.9, 0.9, 0.9, 0.9])
    assert lrs == pytest.approx([LR] * 5 + [LR / 2, LR / 2, LR / 4])

    optimizer, schedule = _plateau(patience=1, higher=True)
    lrs = _epochs(optimizer, schedule, [0.5, 0.6, 0.6, 0.7, 0.1])
    assert lrs == pytest.approx([LR, LR, LR / 2, LR / 2, LR / 4])

    optimizer, schedule = _plateau(patience=1)
    lrs = _epochs(optimizer, schedule, [1.0] * 10)
    assert lrs[-1] == pytest.approx(0.02 * LR) and min(lrs) == pytest.approx(0.02 * LR)


def test_plateau_counts_epochs_after_warmup() -> None:
    """Warm-up over 5 steps: epochs ending in it (2 steps each) neither count nor cut; the
    lr then reaches lr exactly and the first epoch after warm-up sets the best score."""
    optimizer, schedule = _plateau(patience=1, warmup=5)
    lrs = _epochs(optimizer, schedule, [1.0, 1.0, 1.0, 1.0, 1.0])
    # epochs 1-2 end at steps 2 and 4, in warm-up (the lr rising 1/5 per step); epoch 3 ends
    # at step 6, warm-up over: its score is the first counted; epoch 4 has no gain: a cut
    assert lrs == pytest.approx([LR * 3 / 5, LR * 5 / 5, LR, LR / 2, LR / 4])


def _config(root: Path, name: str = "sched", **optim: object) -> ExperimentConfig:
    return ExperimentConfig.model_validate(
        {
            "name": name,
            "tasks": ["mp-band-gap"],
            "data": {"root": str(root)},
            "model": {"name": "egnn", "params": TINY_EGNN, "head_hidden": 16},
            "optim": {"lr": LR, "epochs": 4, **optim},
        }
    )


def _resumed(directory: Path, config: ExperimentConfig, spe: int) -> tuple:
    """A fresh model, optimiser and schedule loaded from ``directory``, as a worker does."""
    model = MatSciModel.from_config(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.lr)
    schedule = Schedule(optimizer, config.optim, spe, higher_is_better=False)
    load_training_state(read_checkpoint(directory), model, optimizer, schedule)
    return optimizer, schedule


@pytest.mark.parametrize(
    "optim",
    [
        {"scheduler": "cosine", "warmup_steps": 3},
        {"scheduler": "plateau", "warmup_steps": 3, "plateau_patience": 1},
    ],
)
def test_schedule_continues_through_a_checkpoint(tmp_path: Path, optim: dict) -> None:
    """Saved mid-run (``save_checkpoint``, loaded back as plain data), the schedule goes on
    exactly as an uninterrupted one: step count, cosine position, plateau's best and cut lr."""
    config = _config(tmp_path, **optim)
    model = MatSciModel.from_config(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    schedule = Schedule(optimizer, config.optim, 5, higher_is_better=False)
    first = _epochs(optimizer, schedule, [1.0, 0.8, 0.9])  # a cut at epoch 3 (plateau)
    save_checkpoint(tmp_path, model, config, optimizer, schedule, epoch=3)

    again_optimizer, again = _resumed(tmp_path, config, 5)
    assert (again.steps, again.lr) == (schedule.steps, schedule.lr) == (6, first[-1])
    later = [0.85, 0.85, 0.7, 0.8]
    assert _epochs(again_optimizer, again, later) == _epochs(optimizer, schedule, later)


def test_checkpoint_of_the_old_lambda_continues(tmp_path: Path) -> None:
    """A checkpoint written with the old ``LambdaLR`` (its step count in ``last_epoch``)
    continues the same cosine at the same step."""
    config = _config(tmp_path, scheduler="cosine", warmup_steps=3)
    model = MatSciModel.from_config(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    factor = _old_factor(config.optim, 5)
    old = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    for _ in range(7):
        optimizer.step()
        old.step()
    save_checkpoint(tmp_path, model, config, optimizer, old, epoch=1)

    resumed_optimizer, schedule = _resumed(tmp_path, config, 5)
    for step in range(7, 25):
        assert schedule.steps == step
        assert schedule.lr == pytest.approx(LR * factor(step), rel=1e-12), step
        _step(resumed_optimizer, schedule)


def _write(tmp_path: Path, optim: dict) -> Path:
    raw = {
        "name": "x",
        "tasks": ["mp-band-gap"],
        "data": {"root": str(tmp_path)},
        "optim": optim,
    }
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(
    ("optim", "words"),
    [
        ({"plateau_factor": 1.0}, "optim.plateau_factor: Input should be less than 1"),
        ({"plateau_patience": 0}, "optim.plateau_patience: Input should be greater than 0"),
        (
            {"scheduler": "plateau", "plateau_patience": 3, "early_stopping_patience": 3},
            "optim.early_stopping_patience: Value error, must exceed optim.plateau_patience (3)",
        ),
    ],
)
def test_plateau_settings_are_checked(tmp_path: Path, optim: dict, words: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(_write(tmp_path, optim))
    assert words in str(error.value) and "\n" not in str(error.value)
    # early stopping after the first cut, or with another scheduler, is fine
    load_config(_write(tmp_path, {**optim, "plateau_factor": 0.5, "plateau_patience": 1}))


@pytest.fixture(scope="module")
def data_root(samples: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.samples import ingest_in_process

    root = tmp_path_factory.mktemp("ingested")
    docs = samples / "materials_project" / "summary_docs.jsonl"
    return ingest_in_process("materials-project", docs, root)


@pytest.mark.usefixtures("ray_local")
def test_plateau_run_keeps_best_and_latest_checkpoints(
    data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real 3-epoch run whose loss weight is -1 (gradient ascent: every epoch validates
    worse than the first). Plateau (patience 1) halves the lr after epochs 2 and 3; the run
    keeps epoch 1's checkpoint (the best) and epoch 3's (the latest), and prints both."""
    from matsci_ray.cli.main import main
    from matsci_ray.train.telemetry import read_history

    storage = tmp_path / "runs"
    raw = {
        "name": "ascent",
        "tasks": ["mp-band-gap"],
        "data": {"root": str(data_root), "cutoff": 4.0, "batch_size": 16, "max_train_samples": 64},
        "model": {"name": "egnn", "params": TINY_EGNN, "head_hidden": 16},
        "loss": {"task_weights": {"mp-band-gap": -1.0}},
        "optim": {"lr": LR, "epochs": 3, "scheduler": "plateau", "plateau_patience": 1},
        "run": {
            "num_workers": 1,
            "cpus_per_worker": 0.5,
            "storage": str(storage),
            "threads_per_worker": 1,
        },
    }
    path = tmp_path / "ascent.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["train", str(path)]) == 0

    run_dir = storage / "ascent"
    history = read_history(run_dir)
    scores = [row["val/mp-band-gap/mse"] for row in history]
    assert scores[0] < min(scores[1:]), scores  # the run's premise: epoch 1 is the best
    assert [row["lr"] for row in history] == pytest.approx([LR, LR / 2, LR / 4])

    kept = {checkpoint_epoch(p): p for p in run_dir.glob("checkpoint_*/")}
    assert sorted(kept) == [1, 3]
    out = capsys.readouterr().out
    assert f"checkpoint: {kept[3]}" in out.splitlines()
    best = [line for line in out.splitlines() if line.startswith("best checkpoint: ")]
    assert best == [f"best checkpoint: {kept[1]} (epoch 1, val/mp-band-gap/mse = {scores[0]:.6g})"]


def test_max_steps_per_epoch_caps_the_plan() -> None:
    """An epoch of 100 batches cut at 3 steps: cosine plans 2 x 3 steps, and reaches its
    floor after them; a resumed epoch that took 2 has 1 left (every worker the same)."""
    from matsci_ray.train.batches import remaining_steps
    from matsci_ray.train.schedule import MIN_LR_FRACTION

    optim = OptimConfig(lr=LR, epochs=2, scheduler="cosine", max_steps_per_epoch=3)
    optimizer = _optimizer()
    schedule = Schedule(optimizer, optim, steps_per_epoch=100, higher_is_better=False)
    assert schedule.total == 6
    for _ in range(6):
        _step(optimizer, schedule)
    assert schedule.lr == pytest.approx(MIN_LR_FRACTION * LR)
    config = ExperimentConfig.model_validate(
        {"name": "c", "tasks": ["mp-band-gap"], "data": {"root": "/d"}, "optim": optim.model_dump()}
    )
    assert [remaining_steps(config, taken) for taken in (0, 2, 3)] == [3, 1, 0]


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_epochs_end_after_max_steps_per_epoch(data_root: Path, tmp_path: Path) -> None:
    """Two workers streaming their splits (no cache, no sample): each epoch stops after 2
    steps, all workers together, and the next epoch starts a new pass (Ray's split
    coordinator restarts once every worker asks again); the cosine plan is 3 x 2 steps,
    so the last step reaches the floor lr."""
    from matsci_ray.train.schedule import MIN_LR_FRACTION
    from matsci_ray.train.telemetry import read_history
    from matsci_ray.train.trainer import build_trainer
    from tests.test_resume import _raw as resume_run

    raw = resume_run(data_root, tmp_path / "runs", "capped", num_workers=2, cpus_per_worker=0.4)
    raw["data"] = {**raw["data"], "batch_size": 4, "max_train_samples": None}
    raw["data"]["cache_graphs"] = "never"
    raw["optim"]["max_steps_per_epoch"] = 2
    result = build_trainer(ExperimentConfig.model_validate(raw)).fit()
    history = read_history(tmp_path / "runs" / "capped")
    assert [(row["epoch"], row["step"], row["workers"]) for row in history] == [
        (1, 2, 2),
        (2, 4, 2),
        (3, 6, 2),
    ]
    assert result.metrics["lr"] == pytest.approx(MIN_LR_FRACTION * raw["optim"]["lr"])
