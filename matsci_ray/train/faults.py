"""Fault injection for tests (``run.fail_at_epoch``, ``run.fail_at_step``,
``run.hold_shrunk_while_file_exists``): a worker that dies as a lost node's would, once per
run directory, and a shrunk run held open until a test's new node joins."""

from __future__ import annotations

import os
import time

from matsci_ray.config import ExperimentConfig
from matsci_ray.storage import exists, write_text


def maybe_fail(config: ExperimentConfig, epoch: int, rank: int) -> None:
    """Testing hook: rank 0 dies (once per run directory) at ``run.fail_at_epoch``."""
    if config.run.fail_at_epoch == epoch and rank == 0:
        _die_once(config, f".failed-at-{epoch}")


def hold_while_shrunk(config: ExperimentConfig, world: int) -> None:
    """Testing hook: on fewer than MAX workers, wait after the epoch (reported and
    checkpointed) while ``run.hold_shrunk_while_file_exists`` exists, so the run cannot end
    before a test's new node joins; the resize to more workers ends this group meanwhile."""
    gate, full = config.run.hold_shrunk_while_file_exists, config.run.max_workers
    while gate is not None and world < full and gate.exists():
        time.sleep(0.2)


def maybe_fail_at_step(config: ExperimentConfig, step: int, rank: int) -> None:
    """Testing hook: rank 0 dies (once per run directory) after reporting the checkpoint of
    step ``run.fail_at_step``, once the controller has had time to collect that report (it
    polls every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``; a report still queued in a dead
    worker is lost, as it would be on a lost node)."""
    if config.run.fail_at_step == step and rank == 0:
        _die_once(config, f".failed-at-step-{step}", after_s=3.0)


def _die_once(config: ExperimentConfig, marker_name: str, after_s: float = 0.0) -> None:
    """Exit this worker at once, unless the run directory's ``marker_name`` says it did."""
    marker = config.run.storage / config.name / marker_name
    if exists(marker):
        return
    write_text(marker, "")
    time.sleep(after_s)
    os._exit(1)
