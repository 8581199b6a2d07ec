"""The README's main command, ``matsci-ray demo``, at a tiny budget: every source ingested, a
single-task run evaluated on test, a multi-task pair (additive and PCGrad), a multi-data pair
and a 2-trial Optuna sweep on Ray Tune, and a leaderboard holding all of them.

The demo runs once for the module (it makes six Ray Train runs and is the suite's longest
test); the tests below read what it printed and wrote: its console, each Tune family's
trials against the runs' own histories and the report's tables, and a study started again,
which restores its finished trials instead of training them again."""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from matsci_ray.cli.main import main

# every sample source ingested and six Ray Train runs: on a shared 2-core machine, more than
# the suite's 10 minutes per test
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500), pytest.mark.usefixtures("ray_local")]

EPOCHS, STUDY_EPOCHS = 2, 1


@dataclass
class Demo:
    out: Path
    code: int
    printed: str  # standard output
    console: list[str]  # standard output and error, in lines

    def trials(self, family: str) -> list[dict]:
        text = (self.out / "studies" / family / "trials.jsonl").read_text()
        return [json.loads(line) for line in text.splitlines() if line]


@contextmanager
def _file_descriptors_to(stdout: Path, stderr: Path) -> Iterator[None]:
    """File descriptors 1 and 2, and ``sys.stdout``/``sys.stderr``, into files: what Ray's
    processes and threads print counts too (a module fixture has no ``capfd``)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2), sys.stdout, sys.stderr)
    with stdout.open("w") as out, stderr.open("w") as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            sys.stdout, sys.stderr = saved[2], saved[3]


@pytest.fixture(scope="module")
def demo(samples: Path, tmp_path_factory: pytest.TempPathFactory) -> Demo:
    base = tmp_path_factory.mktemp("demo")
    out, stdout, stderr = base / "demo", base / "stdout.txt", base / "stderr.txt"
    argv = ["demo", "--samples", str(samples), "--out", str(out), "--epochs", str(EPOCHS),
            "--study-epochs", str(STUDY_EPOCHS)]  # fmt: skip
    with _file_descriptors_to(stdout, stderr):
        code = main(argv)
    printed, errors = stdout.read_text(), stderr.read_text()
    return Demo(out, code, printed, (printed + errors).splitlines())


def test_demo_runs_every_family_and_writes_the_leaderboard(demo: Demo) -> None:
    assert demo.code == 0, "\n".join(demo.console[-60:])
    console, printed = demo.console, demo.printed
    assert len(console) < 150, "\n".join(console)
    dashboard = next(i for i, x in enumerate(console) if x.startswith("dashboard:   http://"))
    first_epoch = next(i for i, x in enumerate(console) if x.startswith(f"epoch 1/{EPOCHS}"))
    assert dashboard < first_epoch
    assert "Reporting training result" not in printed  # Ray Train's per-report dicts
    ray_log = demo.out / "ray.log"
    assert f"Ray logs: {ray_log}" in printed and ray_log.stat().st_size > 0
    for source in ("oc20-s2ef", "oc20-is2re", "materials-project", "lips", "oqmd", "nomad"):
        assert f"ingested {source}:" in printed
    assert "mp-formation-energy" in printed and "test" in printed  # the test-split table

    assert demo.trials("dataset-pair")[0]["datasets"] == ["materials-project", "oqmd"]
    for family in ("task-pair", "dataset-pair", "sweep"):
        assert all(t["error"] is None for t in demo.trials(family))
    leaderboard = (demo.out / "report" / "leaderboard.md").read_text()
    for heading in ("Table 3", "Table 4", "Table 5"):
        assert heading in leaderboard
    assert (demo.out / "report" / "report.html").stat().st_size > 10_000
    for label in ("leaderboard:", "report:", "tensorboard:", "checkpoint:", "Ray logs:"):
        assert label in printed.split("where to look:")[1]


def _history(trial: dict) -> list[dict]:
    text = (Path(trial["run_dir"]) / "history.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


def _table(demo: Demo, name: str) -> list[dict[str, str]]:
    with (demo.out / "report" / f"{name}.csv").open() as rows:
        return list(csv.DictReader(rows))


def test_task_pair_trials_are_their_runs_and_the_table_holds_them(demo: Demo) -> None:
    """Additive and PCGrad, each at the base run's seed (a study that lists none has one),
    Tune's metrics exactly the run's last epoch, and Table 4 exactly each trial's metrics."""
    trials = demo.trials("task-pair")
    assert sorted(t["combine"] for t in trials) == ["additive", "pcgrad"]
    rows = _table(demo, "table4_task_pairs")
    reported = {(r["combine"], r["task"]): float(r["mean"]) for r in rows}
    for trial in trials:
        assert trial["metrics"]["epoch"] == STUDY_EPOCHS
        assert trial["seed"] == trial["params"]["seed"] == 42
        assert trial["run_dir"].endswith("-seed42")
        last = _history(trial)[-1]
        for task, metric in (("mp-formation-energy", "mse"), ("mp-stability", "accuracy")):
            key = f"val/{task}/{metric}"
            assert trial["metrics"][key] == last[key]
            assert reported[(trial["combine"], task)] == trial["metrics"][key]


def test_optuna_sweep_samples_two_trials_within_the_ranges(demo: Demo) -> None:
    """Optuna samples two distinct points, ASHA stops at max_t, the second trial still gets
    the CPUs (a stopped trial's Train placement group is released), and the sweep table
    holds each trial's own final metric."""
    from matsci_ray.config.study import SweepConfig

    low, high = SweepConfig().lr  # the demo's sweep keeps the default ranges of lr and cutoff
    cutoffs = SweepConfig().cutoff
    trials = demo.trials("sweep")
    assert len(trials) == 2
    assert len({t["params"]["lr"] for t in trials}) == 2
    mse = "val/mp-formation-energy/mse"
    for trial in trials:
        assert low <= trial["params"]["lr"] <= high
        assert cutoffs[0] <= trial["params"]["cutoff"] <= cutoffs[1]
        # ASHA may stop a trial while its run writes the next epoch: compare the same epoch
        by_epoch = {row["epoch"]: row for row in _history(trial)}
        assert trial["metrics"][mse] == by_epoch[trial["metrics"]["epoch"]][mse]
    by_trial = {t["trial_id"]: t for t in trials}
    rows = _table(demo, "sweeps")
    assert len(rows) == 2
    for row in rows:  # one trial per sweep row
        assert float(row["mean"]) == by_trial[row["trial_ids"]]["metrics"][mse]


def test_a_finished_study_started_again_restores_its_trials(demo: Demo) -> None:
    """The demo's task-pair study run a second time: the same trials, restored from its
    storage, and no epoch trained again."""
    from matsci_ray.cli.demo import studies
    from matsci_ray.config import StudyConfig
    from matsci_ray.experiments.study import run_study

    args = argparse.Namespace(model="egnn", epochs=EPOCHS, study_epochs=STUDY_EPOCHS)
    (raw,) = [s for s in studies(args, demo.out / "data", demo.out / "studies")
              if s["family"] == "task-pair"]  # fmt: skip
    before = demo.trials("task-pair")
    written = run_study(StudyConfig.model_validate(raw))
    again = [json.loads(line) for line in written.read_text().splitlines()]
    assert {t["trial_id"] for t in again} == {t["trial_id"] for t in before}
    for trial in before:
        assert len(_history(trial)) == STUDY_EPOCHS
