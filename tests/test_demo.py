"""The README's main command, ``matsci-ray demo``, at a tiny budget: every source ingested, a
single-task run evaluated on test, a multi-task pair, a multi-data pair and a 2-trial sweep on
Ray Tune, and a leaderboard holding all of them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from matsci_ray.cli.main import main

# every sample source ingested and six Ray Train runs: on a shared 2-core machine, more than
# the suite's 10 minutes per test
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500), pytest.mark.usefixtures("ray_local")]


def test_demo_runs_every_family_and_writes_the_leaderboard(
    samples: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo"
    code = main(
        ["demo", "--samples", str(samples), "--out", str(out), "--epochs", "2",
         "--study-epochs", "1"]
    )  # fmt: skip
    # file descriptors, not sys.stdout: what Ray's processes and threads print counts too
    captured = capfd.readouterr()
    printed = captured.out
    console = (captured.out + captured.err).splitlines()
    assert code == 0, captured.err[-3000:]
    assert len(console) < 150, "\n".join(console)
    dashboard = next(i for i, x in enumerate(console) if x.startswith("dashboard:   http://"))
    first_epoch = next(i for i, x in enumerate(console) if x.startswith("epoch 1/2"))
    assert dashboard < first_epoch
    assert "Reporting training result" not in printed  # Ray Train's per-report dicts
    ray_log = out / "ray.log"
    assert f"Ray logs: {ray_log}" in printed and ray_log.stat().st_size > 0
    for source in ("oc20-s2ef", "oc20-is2re", "materials-project", "lips", "oqmd", "nomad"):
        assert f"ingested {source}:" in printed
    assert "mp-formation-energy" in printed and "test" in printed  # the test-split table

    studies = out / "studies"
    trials = {
        family: [
            json.loads(x) for x in (studies / family / "trials.jsonl").read_text().split("\n") if x
        ]
        for family in ("task-pair", "dataset-pair", "sweep")
    }
    assert sorted(t["combine"] for t in trials["task-pair"]) == ["additive", "pcgrad"]
    assert trials["dataset-pair"][0]["datasets"] == ["materials-project", "oqmd"]
    assert len(trials["sweep"]) == 2
    assert all(t["error"] is None for family in trials.values() for t in family)

    leaderboard = (out / "report" / "leaderboard.md").read_text()
    for heading in ("Table 3", "Table 4", "Table 5"):
        assert heading in leaderboard
    assert (out / "report" / "report.html").stat().st_size > 10_000
    for label in ("leaderboard:", "report:", "tensorboard:", "checkpoint:", "Ray logs:"):
        assert label in printed.split("where to look:")[1]
