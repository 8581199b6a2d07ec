"""Shared fixtures: one local Ray for the whole session, its files inside pytest's tmp dir."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# Fast, quiet, deterministic local Ray for tests (see DEVELOPERS.md: Ray 2.60 on 2 CPUs).
os.environ.setdefault("RAY_DATA_USE_DATASOURCE_V2", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    import ray

    from matsci_ray.ray_env import init_ray

    temp = tmp_path_factory.mktemp("ray")
    init_ray(num_cpus=2, temp_dir=temp)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def samples() -> Path:
    from tests.samples import SAMPLES

    if not SAMPLES.exists():
        pytest.skip(f"sample data not found at {SAMPLES}")
    return SAMPLES
