"""``run.checkpoint_every_steps``: checkpoints mid-epoch, and a run that continues from one
(a ``FailureConfig`` restart, or ``--resume``) finishes the epoch and the schedule where an
uninterrupted run does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from matsci_ray.config import ExperimentConfig
from matsci_ray.train.checkpoint import read_checkpoint
from tests.samples import ingest_in_process
from tests.test_resume import _raw as resume_run

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]

METRIC = "val/mp-band-gap/mse"
STEPS_PER_EPOCH = 4  # 64 rows / batch 16, one worker


@pytest.fixture(scope="module")
def data_root(samples: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ingested")
    docs = samples / "materials_project" / "summary_docs.jsonl"
    return ingest_in_process("materials-project", docs, root)


def _config(root: Path, storage: Path, name: str, **run: object) -> ExperimentConfig:
    """test_resume's run (one worker, cosine, cached graphs), checkpointed every 3 steps."""
    return ExperimentConfig.model_validate(
        resume_run(root, storage, name, checkpoint_every_steps=3, **run)
    )


def _lines(run_dir: Path) -> list[int]:
    text = (run_dir / "history.jsonl").read_text()
    return [json.loads(line)["epoch"] for line in text.splitlines() if line.strip()]


def test_restart_and_resume_from_a_mid_epoch_checkpoint(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """12 steps in one go; a worker that dies after the step-6 checkpoint (2 steps into
    epoch 2) and is restarted; a run stopped there and ``resume_from`` its step-6
    checkpoint: all three end at step 12 with the same lr and validation error, their
    histories holding epochs 1-3 once."""
    from matsci_ray.train import trainer
    from matsci_ray.train.trainer import build_trainer

    monkeypatch.setattr(trainer, "CACHE_BLOCK_ROWS", 8)  # 8 blocks: each epoch's order matters
    storage = tmp_path / "runs"
    full = build_trainer(_config(data_root, storage, "full")).fit()
    assert full.metrics["step"] == 3 * STEPS_PER_EPOCH

    restarted = build_trainer(
        _config(data_root, storage, "restarted", fail_at_step=6, max_failures=1)
    ).fit()
    assert (storage / "restarted" / ".failed-at-step-6").exists()

    stopped = _config(data_root, storage, "stopped", fail_at_step=6, max_failures=0)
    with pytest.raises(Exception):  # noqa: B017 - Ray Train's failure wrapper, whatever its type
        build_trainer(stopped).fit()
    (mid,) = [
        p
        for p in (storage / "stopped").glob("checkpoint_*/")
        if read_checkpoint(p)["scheduler"]["steps"] == 6
    ]
    state = read_checkpoint(mid)
    assert state["epoch"] == 1 and state["scheduler"]["epoch_start"] == STEPS_PER_EPOCH
    resumed = build_trainer(_config(data_root, storage, "resumed"), resume_from=mid).fit()

    for run in (restarted, resumed):
        assert run.metrics["epoch"] == 3 and run.metrics["step"] == full.metrics["step"]
        assert run.metrics["lr"] == pytest.approx(full.metrics["lr"], rel=1e-12)
        # one worker, blocks in plan order, the trained batches skipped: the same arithmetic
        assert run.metrics[METRIC] == pytest.approx(full.metrics[METRIC], rel=1e-6)
    for name in ("restarted", "resumed"):
        assert _lines(storage / name) == [1, 2, 3]


def test_epochs_end_after_max_steps_per_epoch(data_root: Path, tmp_path: Path) -> None:
    """Two workers streaming their splits (no cache, no sample): each epoch stops after 2
    steps, all workers together, and the next epoch starts a new pass (Ray's split
    coordinator restarts once every worker asks again); the cosine plan is 3 x 2 steps,
    so the last step reaches the floor lr."""
    from matsci_ray.train.schedule import MIN_LR_FRACTION
    from matsci_ray.train.telemetry import read_history
    from matsci_ray.train.trainer import build_trainer

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
