"""Shared fixtures: one local Ray for the whole session, its files inside pytest's tmp dir."""

from __future__ import annotations

import os
import shutil
import tempfile
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
    """Under pytest-xdist each worker starts its own Ray at once: a dashboard port of its own
    (a free one the kernel picks, not Ray's usual one, which both would find free)."""
    from matsci_ray.ray_env import DASHBOARD_PORT_VARIABLE, free_port, init_ray

    LOCAL_RAY["temp"] = temp
    before = os.environ.get(DASHBOARD_PORT_VARIABLE)
    if os.environ.get("PYTEST_XDIST_WORKER") and before is None:
        os.environ[DASHBOARD_PORT_VARIABLE] = str(free_port(0))
    try:
        init_ray(num_cpus=2, temp_dir=temp)
    finally:  # only this Ray: a CLI run that a test starts picks its own
        if before is None:
            os.environ.pop(DASHBOARD_PORT_VARIABLE, None)


@contextmanager
def ray_temp_dir() -> Iterator[Path]:
    """A Ray temp dir with a short path: Ray's socket paths under it must fit AF_UNIX's 107
    bytes, which pytest's own temp dirs (longer under pytest-xdist) overrun."""
    temp = Path(tempfile.mkdtemp(prefix="mr", dir="/tmp"))
    try:
        yield temp
    finally:
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    import ray

    with ray_temp_dir() as temp:
        start_local_ray(temp)
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
