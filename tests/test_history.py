"""``history.jsonl``: one line per epoch from rank 0's Telemetry, stamped with the wall-clock
time it was logged, read back as the last report of each epoch."""

from __future__ import annotations

import time
from pathlib import Path

from matsci_ray.config import ExperimentConfig
from matsci_ray.train.telemetry import HISTORY_TIME, Telemetry, read_history


def _config(tmp_path: Path) -> ExperimentConfig:
    return ExperimentConfig.model_validate(
        {
            "name": "history-test",
            "tasks": ["mp-band-gap"],
            "data": {"root": str(tmp_path)},
            "run": {"storage": str(tmp_path)},
        }
    )


def test_each_epoch_is_logged_with_the_time_it_ended(tmp_path: Path) -> None:
    telemetry = Telemetry(_config(tmp_path), rank=0)
    stamps = []
    for epoch, loss in [(1, 0.5), (2, 0.25), (2, 0.2)]:  # epoch 2 again: a restart repeats it
        before = time.time()
        telemetry.log({"train/mp-band-gap/loss": loss}, epoch)
        stamps.append((before, time.time()))
        time.sleep(0.01)
    telemetry.close()

    history = read_history(tmp_path / "history-test")
    assert [row["epoch"] for row in history] == [1, 2]
    assert history[1]["train/mp-band-gap/loss"] == 0.2  # the later report of epoch 2
    for row, (before, after) in zip(history, [stamps[0], stamps[2]], strict=True):
        assert before <= row[HISTORY_TIME] <= after


def test_other_ranks_write_no_history(tmp_path: Path) -> None:
    telemetry = Telemetry(_config(tmp_path), rank=1)
    telemetry.log({"train/mp-band-gap/loss": 0.5}, 1)
    telemetry.close()
    assert read_history(tmp_path / "history-test") == []
