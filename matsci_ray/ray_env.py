"""Starting or joining Ray the same way from the CLI, jobs and tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import ray
import ray._private.ray_constants as ray_constants


def init_ray(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    temp_dir: Path | None = None,
    include_dashboard: bool = True,
    metrics_export_port: int | None = None,
) -> str | None:
    """Join ``address`` (or ``RAY_ADDRESS``), else start a local Ray in-process.

    Returns the dashboard URL when one is running. A local Ray listens on 127.0.0.1 only
    (dashboard, job server, metrics, gRPC); expose it deliberately (see README). Keep the
    dashboard: it serves the State API, without which Ray Train's placement-group cleaner
    cannot tell that a stopped Tune trial's trainer died, so its CPUs leak and the next trial
    never schedules.
    """
    if ray.is_initialized():
        return None
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        return ray.init(address=address, log_to_driver=True).dashboard_url or None
    kwargs: dict[str, object] = {
        "num_cpus": num_cpus,
        "num_gpus": num_gpus,
        "include_dashboard": include_dashboard,
        "dashboard_host": "127.0.0.1",
        "log_to_driver": True,
    }
    # Ray kills idle workers beyond this limit (default: the CPU count, which Ray Train's own
    # actors exceed on a small node), so every Ray Data execution re-spawned workers that
    # re-import torch: a ~5 s stall per epoch (benchmarks/README.md). Keep them alive.
    kwargs["_system_config"] = {
        "num_workers_soft_limit": max(16, 4 * (num_cpus or os.cpu_count() or 1))
    }
    if metrics_export_port is not None:  # where Prometheus scrapes this node
        kwargs["_metrics_export_port"] = metrics_export_port
    if temp_dir is not None:
        kwargs["_temp_dir"] = str(Path(temp_dir).resolve())
    with _loopback_node():
        return ray.init(**kwargs).dashboard_url or None


@contextmanager
def _loopback_node() -> Iterator[None]:
    """Start a local Ray whose node address is 127.0.0.1, so that its gRPC servers (GCS,
    raylet, workers), dashboard agent and metrics endpoint listen on loopback only: none of
    them authenticates unless token auth is on. ``ray.init`` turns an explicit
    ``_node_ip_address="127.0.0.1"`` into the machine's address and binds every interface;
    the loopback address is what Ray itself uses where it expects no cluster (Windows and
    macOS), decided by this flag when the node starts. ``tests/test_local_ray.py`` checks
    every listening socket, so a Ray release that moves the flag fails there."""
    previous = getattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = previous
