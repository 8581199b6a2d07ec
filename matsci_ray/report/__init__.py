"""Reports on finished experiments: the trials they read, and where those come from.

A trial is one finished training run. Tune experiments list theirs in ``trials.jsonl`` (one
JSON object per line, written next to the trials' run directories)::

    {"trial_id": str, "family": "single-task" | "task-pair" | "dataset-pair" | "sweep",
     "tasks": [task, ...], "datasets": [dataset, ...], "model": a registered model name,
     "combine": "additive" | "pcgrad" | null, "params": {name: value, ...},
     "run_dir": path (absolute, or relative to the trials.jsonl's directory),
     "metrics": {key: value, ...},   # the trial's final report, keys as in history.jsonl
     "error": str | null}            # why the trial failed; failed trials stay out of tables

``trial_id``, ``family``, ``tasks``, ``model`` and ``metrics`` are required; ``datasets``
defaults to the tasks' data sets, ``combine`` to null (additive), ``params`` to ``{}`` (a
non-object value is kept as ``{"variant": value}``), ``run_dir`` to none (no curves or parity
plots then) and ``error`` to null. Other keys are ignored. A plain ``matsci-ray train`` run
directory (``history.jsonl``, ``checkpoint_*/``) is read as a trial too.

:mod:`matsci_ray.report.tables` builds the paper's tables, :mod:`matsci_ray.report.html` the
self-contained HTML page.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matsci_ray.storage import Location, exists, glob, is_file, location, read_text, resolve, rglob
from matsci_ray.tasks.registry import TASKS, metric_key
from matsci_ray.train.telemetry import HISTORY, read_history

TRIALS_FILE = "trials.jsonl"
# Tune writes one of the first four; "multi-task" only names plain runs of 3+ tasks.
FAMILIES = ("single-task", "task-pair", "dataset-pair", "sweep", "multi-task")


@dataclass
class Trial:
    """One finished run: a line of ``trials.jsonl`` or a plain run directory."""

    trial_id: str
    family: str
    tasks: list[str]
    datasets: list[str]
    model: str
    combine: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    run_dir: Location | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def value(self, task: str) -> float | None:
        """The task's primary validation metric as reported, or None if not reported."""
        got = self.metrics.get(metric_key(task))
        return float(got) if isinstance(got, int | float) and not isinstance(got, bool) else None

    @property
    def column(self) -> str:
        """Model, plus the gradient combination when it is not the default (additive)."""
        if self.combine in (None, "additive"):
            return self.model
        return f"{self.model} ({self.combine})"


def latest_checkpoint(run_dir: Location | None) -> Location | None:
    """Newest ``checkpoint_*/checkpoint.pt``: Ray names them by time or by a zero-padded index,
    so the last in name order is the last written, the one whose metrics are final."""
    if run_dir is None:
        return None
    found = sorted(glob(run_dir, "checkpoint_*/checkpoint.pt"), key=str)
    return found[-1] if found else None


def ordered_tasks(tasks: Iterable[str]) -> list[str]:
    order = list(TASKS)
    return sorted(tasks, key=order.index)  # registry order: one label per pair, however listed


def _trial_from_json(raw: dict[str, Any], where: str, base: Location) -> Trial:
    for key in ("trial_id", "family", "tasks", "model", "metrics"):
        if key not in raw:
            raise ValueError(f"{where}: trial has no {key!r}")
    if raw["family"] not in FAMILIES[:4]:
        raise ValueError(f"{where}: family {raw['family']!r} is not one of {FAMILIES[:4]}")
    unknown = [t for t in raw["tasks"] if t not in TASKS]
    if unknown:
        raise ValueError(f"{where}: unknown task(s) {unknown}")
    run_dir, params = raw.get("run_dir"), raw.get("params") or {}
    return Trial(
        trial_id=str(raw["trial_id"]),
        family=raw["family"],
        tasks=list(raw["tasks"]),
        datasets=list(raw.get("datasets") or dict.fromkeys(TASKS[t].dataset for t in raw["tasks"])),
        model=str(raw["model"]),
        combine=raw.get("combine"),
        params=params if isinstance(params, dict) else {"variant": params},
        # relative run directories are relative to the trials.jsonl, so experiments can move
        run_dir=_run_dir(base, run_dir) if run_dir else None,
        metrics=dict(raw["metrics"]),
        error=str(raw["error"]) if raw.get("error") else None,
    )


def _run_dir(base: Location, run_dir: str) -> Location:
    """A trial's run directory: a URI or absolute path as written, else under ``base``."""
    given = location(run_dir)
    return resolve(base / given) if isinstance(given, Path) else given


def read_trials_file(path: Location) -> list[Trial]:
    trials = []
    for number, line in enumerate(read_text(path).splitlines(), 1):
        if line.strip():
            trials.append(_trial_from_json(json.loads(line), f"{path}:{number}", path.parent))
    return trials


def plain_run(run_dir: Location) -> Trial:
    """A ``matsci-ray train`` run: final metrics are its last epoch's; tasks, model and
    combination come from its checkpoint's config (from the history's keys without one)."""
    history = read_history(run_dir)
    metrics = dict(history[-1]) if history else {}
    tasks: list[str] = []
    model, combine = "unknown", None
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is not None:
        from matsci_ray.config import ExperimentConfig

        # the config only, not a built model
        from matsci_ray.train.checkpoint import read_checkpoint

        config = ExperimentConfig.model_validate(json.loads(read_checkpoint(checkpoint)["config"]))
        tasks, model, combine = list(config.tasks), config.model.name, config.loss.combine
    if not tasks:
        seen = (key.split("/")[1] for key in metrics if key.startswith("val/"))
        tasks = ordered_tasks(dict.fromkeys(t for t in seen if t in TASKS))
    datasets = list(dict.fromkeys(TASKS[t].dataset for t in tasks))
    if len(tasks) == 1:
        family = "single-task"
    elif len(tasks) == 2:
        family = "task-pair" if len(datasets) == 1 else "dataset-pair"
    else:
        family = "multi-task"
    return Trial(
        run_dir.name, family, tasks, datasets, model, combine, {}, resolve(run_dir), metrics
    )


def load_trials(paths: Iterable[Path | str]) -> list[Trial]:
    """Every ``trials.jsonl`` under ``paths`` (recursively), plus run directories with a
    ``history.jsonl`` that no ``trials.jsonl`` accounts for (so no run is counted twice)."""
    trial_files: list[Location] = []
    run_dirs: list[Location] = []
    for path in map(location, paths):
        if not exists(path):
            raise FileNotFoundError(f"{path}: no such file or directory")
        if is_file(path):
            trial_files.append(path)
            continue
        trial_files += rglob(path, TRIALS_FILE)
        run_dirs += [p.parent for p in rglob(path, HISTORY)]
    trials: list[Trial] = []
    covered: set[Location] = set()
    for file in dict.fromkeys(resolve(p) for p in trial_files):
        found = read_trials_file(file)
        trials += found
        covered.add(file.parent)
        covered.update(t.run_dir for t in found if t.run_dir is not None)
    for run in dict.fromkeys(resolve(p) for p in run_dirs):
        if run not in covered and not covered.intersection(run.parents):
            trials.append(plain_run(run))
    return trials
