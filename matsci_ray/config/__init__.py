"""The one config system: typed, validated YAML (pydantic models, unknown keys refused).

A config file is an :class:`ExperimentConfig`; every job, CLI verb and Tune trial reads one.
Relative paths are resolved against the working directory of the command that loads it.

The models, one module per part: :mod:`~matsci_ray.config.experiment` (an experiment),
:mod:`~matsci_ray.config.model` (its encoder, checked against the registry),
:mod:`~matsci_ray.config.study` (grids and sweeps), :mod:`~matsci_ray.config.base` (what they
share: unknown keys refused, YAML read with one clear error line).
"""

from matsci_ray.config.experiment import (
    DataConfig,
    ExperimentConfig,
    LossConfig,
    OptimConfig,
    RunConfig,
    dump_config,
    load_config,
)
from matsci_ray.config.model import ModelConfig, check_encoder_params
from matsci_ray.config.study import StudyConfig, SweepConfig, load_study
from matsci_ray.errors import ConfigError

__all__ = [
    "ConfigError",
    "DataConfig",
    "ExperimentConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "StudyConfig",
    "SweepConfig",
    "check_encoder_params",
    "dump_config",
    "load_config",
    "load_study",
]
