"""A study file (``matsci-ray study``): a grid of experiment families or an Optuna sweep
around one base experiment."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, StrictInt, ValidationInfo, field_validator, model_validator

from matsci_ray.config.base import StrictModel, read_yaml, validate
from matsci_ray.config.experiment import ExperimentConfig, resolve_paths
from matsci_ray.config.model import ModelName
from matsci_ray.tasks.registry import TASKS


class SweepConfig(StrictModel):
    """Optuna search with ASHA early stopping over learning rate, width, depth and cutoff."""

    num_samples: int = Field(8, gt=0)
    lr: tuple[float, float] = (1e-4, 3e-3)
    width: list[int] = Field(default_factory=lambda: [64, 128, 256])
    depth: list[int] = Field(default_factory=lambda: [2, 3, 4])
    cutoff: tuple[float, float] = (4.0, 7.0)
    grace_period: int = Field(1, gt=0, description="epochs before ASHA may stop a trial")
    reduction_factor: int = Field(2, gt=1)


class StudyConfig(StrictModel):
    """A family of experiments (the paper's Tables 3–5, or a sweep) over one base config.

    ``base`` is a full experiment; each trial replaces its tasks, model and loss combination.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    family: Literal["single-task", "task-pair", "dataset-pair", "sweep"]
    base: ExperimentConfig
    models: list[ModelName] = Field(default_factory=lambda: ["egnn"], min_length=1)
    tasks: list[str] | None = Field(None, description="single-task: rows (default: all 13)")
    task_pairs: list[tuple[str, str]] | None = Field(None, description="default: MP pairs")
    combine: list[Literal["additive", "pcgrad"]] = Field(
        default_factory=lambda: ["additive", "pcgrad"]
    )
    dataset_pairs: list[tuple[str, str]] | None = Field(None, description="default: 4 pairs")
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    max_concurrent_trials: int = Field(1, gt=0)
    seeds: list[StrictInt] | None = Field(
        None,
        min_length=1,
        description="run seeds: every cell of a grid is trained once per seed (its trials' "
        "mean, sd and n fill the tables); default [base.run.seed]. A sweep takes one seed",
    )

    @field_validator("tasks")
    @classmethod
    def _known(cls, tasks: list[str] | None) -> list[str] | None:
        unknown = [t for t in tasks or [] if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; choose from {sorted(TASKS)}")
        return tasks

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds: list[int] | None, info: ValidationInfo) -> list[int] | None:
        listed = seeds or []
        repeated = sorted({s for s in listed if listed.count(s) > 1})
        if repeated:  # a repeated seed would be the same run twice, under one run name
            raise ValueError(f"seed(s) {repeated} listed twice")
        # Optuna samples each point once: repeating points per seed would need a searcher
        # of its own, so a sweep's seed spread is measured by running it again
        if info.data.get("family") == "sweep" and len(listed) > 1:
            raise ValueError("a sweep takes one seed; run it again for another")
        return seeds

    @model_validator(mode="after")
    def _default_seed(self) -> StudyConfig:
        if self.seeds is None:
            self.seeds = [self.base.run.seed]
        elif self.family == "sweep":  # its trials and its searcher run with the one seed
            self.base.run.seed = self.seeds[0]
        return self


def load_study(path: Path | str) -> StudyConfig:
    """Read and validate a study YAML (``base`` is an experiment config)."""
    path = Path(path)
    study = validate(StudyConfig, read_yaml(path), path)
    resolve_paths(study.base)
    return study
