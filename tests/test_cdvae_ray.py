"""CDVAE end to end on Ray Train (DDP, two workers): train on a tiny perov-5 set, then the
``generate`` and ``reconstruct`` commands on its checkpoint."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from ase.io import read

from matsci_ray.cli.main import main
from matsci_ray.config import ExperimentConfig
from matsci_ray.train.telemetry import read_history
from matsci_ray.train.trainer import build_trainer
from tests.test_cdvae import TINY, ingest_subset

pytestmark = [pytest.mark.usefixtures("ray_local"), pytest.mark.slow]


def test_train_generate_reconstruct(
    samples: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = ingest_subset(
        samples, tmp_path / "data", "perov_5", {"train": ("val", 32), "val": ("test", 8)}
    )
    config = ExperimentConfig.model_validate(
        {
            "name": "cdvae-tiny",
            "tasks": ["perov5-formation-energy"],
            "data": {"root": str(root), "cutoff": 6.0, "batch_size": 8},
            "model": {"name": "cdvae", "params": {**TINY, "max_atoms": 8}},
            "optim": {"lr": 3e-3, "epochs": 3, "scheduler": "none"},
            "run": {
                "num_workers": 2,
                "cpus_per_worker": 0.5,
                "storage": str(tmp_path / "runs"),
                "threads_per_worker": 1,
            },
        }
    )
    result = build_trainer(config).fit()
    assert result.error is None
    history = read_history(tmp_path / "runs" / "cdvae-tiny")
    assert [row["epoch"] for row in history] == [1, 2, 3]
    # a few steps of noisy objectives: finite here; tests/test_cdvae.py shows it falls
    assert all(
        math.isfinite(row["train/loss"]) and math.isfinite(row["val/loss"]) for row in history
    )
    assert "val/perov5-formation-energy/mse" in history[-1] and "val/coord" in history[-1]

    checkpoint = str(result.checkpoint.path)
    generated = tmp_path / "gen.extxyz"
    flags = ["--steps-per-level", "2", "--batch-size", "4"]
    assert main(["generate", checkpoint, "-n", "5", "--out", str(generated), *flags]) == 0
    atoms = read(generated, ":")
    assert len(atoms) == 5 and all(a.get_volume() > 0 for a in atoms)

    rebuilt = tmp_path / "rec.extxyz"
    args = ["reconstruct", checkpoint, "--split", "val", "--out", str(rebuilt), *flags]
    assert main(args) == 0
    assert len(read(rebuilt, ":")) == 8
    assert "match_rate" in capsys.readouterr().out


def test_cdvae_sweeps_on_ray_tune_like_every_family(samples: Path, tmp_path: Path) -> None:
    """A 1-trial Optuna sweep of CDVAE (width, depth, cutoff, learning rate; test_demo shows
    Optuna sampling two): the trial trains through the generative loop, reports its
    objective's terms and the property's error, and the study records it."""
    import json

    from matsci_ray.config import StudyConfig
    from matsci_ray.experiments.study import run_study

    root = ingest_subset(
        samples, tmp_path / "data", "perov_5", {"train": ("val", 32), "val": ("test", 8)}
    )
    study = StudyConfig.model_validate(
        {
            "name": "cdvae-sweep",
            "models": ["cdvae"],
            "family": "sweep",
            "sweep": {
                "num_samples": 1,
                "lr": [1e-3, 3e-3],
                "width": [8, 16],
                "depth": [1],
                "cutoff": [5.0, 6.0],
                "grace_period": 1,
            },
            "base": {
                "name": "t",
                "tasks": ["perov5-formation-energy"],
                "data": {"root": str(root), "cutoff": 6.0, "batch_size": 8},
                "model": {"name": "cdvae", "params": {**TINY, "max_atoms": 8}},
                "optim": {"lr": 3e-3, "epochs": 1},
                "run": {
                    "num_workers": 2,
                    "cpus_per_worker": 0.5,
                    "storage": str(tmp_path / "runs"),
                    "threads_per_worker": 1,
                },
            },
        }
    )
    lines = Path(run_study(study)).read_text().splitlines()
    (trial,) = [json.loads(line) for line in lines if line]
    assert trial["error"] is None and 1e-3 <= trial["params"]["lr"] <= 3e-3
    metrics = trial["metrics"]
    assert math.isfinite(metrics["val/perov5-formation-energy/mse"])
    assert math.isfinite(metrics["val/coord"]) and math.isfinite(metrics["val/loss"])
