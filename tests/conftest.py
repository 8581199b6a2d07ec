"""Shared fixtures: one local Ray for the whole session, its files inside pytest's tmp dir."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

# Fast, quiet, deterministic local Ray for tests (Ray 2.60 on 2 CPUs).
os.environ.setdefault("RAY_DATA_USE_DATASOURCE_V2", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


LOCAL_RAY: dict[str, Path] = {}  # the session's local Ray temp dir, for a pause and restart


def start_local_ray(temp: Path) -> None:
    from matsci_ray.ray_env import init_ray

    LOCAL_RAY["temp"] = temp
    init_ray(num_cpus=2, temp_dir=temp)


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    import ray

    start_local_ray(tmp_path_factory.mktemp("ray"))
    yield
    ray.shutdown()


@contextmanager
def no_local_ray() -> Iterator[None]:
    """Pause the session's in-process Ray: with two clusters on one machine, Ray Train's
    placement-group cleaner (State API, address auto-detected) may ask the wrong one and
    never free a stopped trial's CPUs."""
    import ray

    running = ray.is_initialized()
    if running:
        ray.shutdown()
    try:
        yield
    finally:
        if running:
            start_local_ray(LOCAL_RAY["temp"])


@pytest.fixture(scope="session")
def samples() -> Path:
    from tests.samples import SAMPLES

    if not SAMPLES.exists():
        pytest.skip(f"sample data not found at {SAMPLES}")
    return SAMPLES


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core machine: one torch thread is far faster than two
    spinning (``pytestmark = pytest.mark.usefixtures("one_thread")`` in a module)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _model_extra_installed(request: pytest.FixtureRequest) -> None:
    """A test parametrised over the model registry (``name``) skips a model whose optional
    extra is not installed, saying how to install it (CI installs every extra)."""
    callspec = getattr(request.node, "callspec", None)
    name = callspec.params.get("name") if callspec else None
    if not isinstance(name, str):
        return
    from matsci_ray.errors import ConfigError
    from matsci_ray.models import encoder_class, model_names

    if name not in model_names():
        return
    try:
        encoder_class(name)
    except ConfigError as error:
        pytest.skip(str(error))
