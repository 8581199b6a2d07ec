"""Where a worker group starts: the checkpoint it continues (a ``FailureConfig`` restart,
an elastic resize, or ``--resume``), loaded into the loop's state, and the run's history
trimmed to match it."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray.train

from matsci_ray.config import ExperimentConfig
from matsci_ray.storage import Location, exists, is_file, location, read_text, write_text
from matsci_ray.train.checkpoint import load_training_state, read_checkpoint
from matsci_ray.train.telemetry import HISTORY

if TYPE_CHECKING:
    from matsci_ray.train.worker import TrainState


def restore(state: TrainState, loop_config: dict[str, Any]) -> dict[str, Any] | None:
    """Load the checkpoint this worker group starts from into ``state`` (epoch, best, stale,
    and the trained weights where it kept a weight average beside them); the checkpoint's
    state, or ``None`` when the run starts afresh.

    Ray Train V2 hands the loop this run's latest checkpoint (after a ``FailureConfig``
    restart, or when a run directory of the same name and storage already holds one), and
    ``--resume`` names another (``loop_config["resume_from"]``). The later of the two wins,
    Ray's on a tie: a restart after a resume continues from the restart's checkpoint."""
    resume = loop_config.get("resume_from")
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and resume is None:
        return None
    with contextlib.ExitStack() as stack:
        candidates = []
        if checkpoint is not None:
            candidates.append(Path(stack.enter_context(checkpoint.as_directory())))
        if resume is not None:
            candidates.append(location(resume))
        states = [read_checkpoint(path) for path in candidates]  # each read once
        latest = max(range(len(states)), key=lambda i: int(states[i]["epoch"]))  # Ray's on a tie
        ray_own = checkpoint is not None and latest == 0  # candidates[0] is Ray's when given
        where = _own_run(state.config) if ray_own else candidates[latest]
        restored = load_training_state(
            states[latest], state.core, state.optimizer, state.scheduler, where
        )
    ema = states[latest].get("ema")
    if ema is not None:  # its model is the average: training goes on from the raw weights
        state.core.load_state_dict(ema["raw_model"])
    state.epoch, state.best, state.stale = restored
    if state.rank == 0:
        resumed = resume is not None and candidates[latest] == location(resume)
        _settle_history(state.config, location(resume) if resumed else None, state.epoch)
    return states[latest]


def _own_run(config: ExperimentConfig) -> str:
    """How to name the checkpoint Ray Train hands a run: its own latest, which a new run
    of the same name in the same storage also continues from."""
    return (
        f"{config.run.storage}/{config.name} (this run's latest checkpoint: a run of the same "
        "name and storage continues from it; name the run anew to start afresh)"
    )


def _settle_history(config: ExperimentConfig, resumed: Location | None, epoch: int) -> None:
    """Make ``history.jsonl`` hold epochs 1 to ``epoch`` once each, before the run goes on
    from a checkpoint of ``epoch``: a run resumed under a new name starts it with the source
    run's epochs (``resumed``: the checkpoint it resumes), and a restart drops any epoch
    logged after its checkpoint (a worker lost between logging an epoch and reporting it)."""
    target = config.run.storage / config.name / HISTORY
    source = target if exists(target) or resumed is None else resumed.parent / HISTORY
    if not is_file(source):
        return
    rows = [line for line in read_text(source).splitlines() if line.strip()]
    kept = [line for line in rows if json.loads(line).get("epoch", 0) <= epoch]
    if source == target and len(kept) == len(rows):
        return
    write_text(target, "".join(f"{line}\n" for line in kept))
