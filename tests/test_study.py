"""Ray Tune studies on the samples: a 2-trial task-pair grid (additive and PCGrad), the report
built from it, and a resumed study that does not rerun finished trials."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from matsci_ray.config import StudyConfig
from matsci_ray.data.ingest import run_ingest
from matsci_ray.data.shards import IngestOptions
from matsci_ray.experiments.study import run_study, variants
from tests.samples import TINY_EGNN

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]


@pytest.fixture(scope="module")
def mp_root(samples: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mp")
    source = "materials-project"
    run_ingest(
        source,
        [samples / "materials_project" / "summary_docs.jsonl"],
        root,
        IngestOptions(source=source),
        progress=False,
    )
    return root


def _study(root: Path, storage: Path, **fields: object) -> StudyConfig:
    raw = {
        "name": "study",
        "models": ["egnn"],
        "base": {
            "name": "t",
            "tasks": ["mp-formation-energy"],
            "data": {"root": str(root), "cutoff": 4.0, "batch_size": 32},
            "model": {
                "name": "egnn",
                "params": TINY_EGNN,
            },
            "optim": {"lr": 3e-3, "epochs": 2},
            "run": {
                "num_workers": 2,
                "cpus_per_worker": 0.5,
                "storage": str(storage),
                "threads_per_worker": 1,
            },
        },
        **fields,
    }
    return StudyConfig.model_validate(raw)


def _trials(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_task_pair_grid_additive_and_pcgrad(mp_root: Path, tmp_path: Path) -> None:
    study = _study(
        mp_root,
        tmp_path,
        name="pairs",
        family="task-pair",
        task_pairs=[["mp-band-gap", "mp-stability"]],
    )
    assert len(variants(study)) == 2
    trials = _trials(run_study(study))
    assert sorted(t["combine"] for t in trials) == ["additive", "pcgrad"]
    for trial in trials:
        assert trial["error"] is None
        assert trial["metrics"]["epoch"] == 2
        # the base run's seed, the one seed of a study that lists none
        assert trial["seed"] == trial["params"]["seed"] == 42
        assert trial["run_dir"].endswith("-seed42")
        history = [
            json.loads(x)
            for x in (Path(trial["run_dir"]) / "history.jsonl").read_text().splitlines()
        ]
        # Tune saw exactly what the run reported in its last epoch
        assert trial["metrics"]["val/mp-band-gap/mse"] == history[-1]["val/mp-band-gap/mse"]

    from matsci_ray.report import load_trials
    from matsci_ray.report.tables import write_tables

    written = write_tables(load_trials([tmp_path / "pairs"]), tmp_path / "report")
    rows = list(csv.DictReader(written["table-4"].open()))
    reported = {(r["combine"], r["task"]): float(r["mean"]) for r in rows}
    for trial in trials:  # the table holds exactly each trial's own reported metrics
        for task, metric in (("mp-band-gap", "mse"), ("mp-stability", "accuracy")):
            assert reported[(trial["combine"], task)] == trial["metrics"][f"val/{task}/{metric}"]

    # a second run restores the finished study instead of training again
    again = _trials(run_study(study))
    assert {t["trial_id"] for t in again} == {t["trial_id"] for t in trials}
    for trial in trials:
        lines = (Path(trial["run_dir"]) / "history.jsonl").read_text().splitlines()
        assert len(lines) == 2


def test_optuna_sweep_two_trials(mp_root: Path, tmp_path: Path) -> None:
    """Optuna samples, ASHA stops at max_t, and the next trial still gets the CPUs: a stopped
    trial's Train placement group must be released (the dashboard's State API does it)."""
    study = _study(
        mp_root,
        tmp_path,
        name="sweep",
        family="sweep",
        sweep={
            "num_samples": 2,
            "lr": [1e-3, 3e-3],
            "width": [8, 16],
            "depth": [1],
            "cutoff": [4.0, 5.0],
            "grace_period": 1,
        },
    )
    trials = _trials(run_study(study))
    assert len(trials) == 2
    assert len({t["params"]["lr"] for t in trials}) == 2  # two distinct Optuna samples
    for trial in trials:
        assert trial["error"] is None
        assert 1e-3 <= trial["params"]["lr"] <= 3e-3
        assert 4.0 <= trial["params"]["cutoff"] <= 5.0
        history = [
            json.loads(x)
            for x in (Path(trial["run_dir"]) / "history.jsonl").read_text().splitlines()
        ]
        mse = "val/mp-formation-energy/mse"
        # ASHA may stop a trial while its run writes the next epoch: compare the same epoch
        by_epoch = {row["epoch"]: row for row in history}
        assert trial["metrics"][mse] == by_epoch[trial["metrics"]["epoch"]][mse]

    from matsci_ray.report import load_trials
    from matsci_ray.report.tables import write_tables

    written = write_tables(load_trials([tmp_path / "sweep"]), tmp_path / "report")
    rows = list(csv.DictReader(written["table-sweep"].open()))
    assert len(rows) == 2
    by_trial = {t["trial_id"]: t for t in trials}
    for row in rows:  # the sweep table holds each trial's own final metric
        trial = by_trial[row["trial_ids"]]  # one trial per sweep row
        assert float(row["mean"]) == trial["metrics"]["val/mp-formation-energy/mse"]
