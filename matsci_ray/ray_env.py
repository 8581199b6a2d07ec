"""Starting or joining Ray the same way from the CLI, jobs and tests."""

from __future__ import annotations

import fcntl
import os
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import ray
import ray._private.ray_constants as ray_constants

from matsci_ray.errors import ClusterError

DASHBOARD_PORT_VARIABLE = "MATSCI_RAY_DASHBOARD_PORT"


def init_ray(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    temp_dir: Path | None = None,
    include_dashboard: bool = True,
    metrics_export_port: int | None = None,
    log_to_driver: bool = False,
) -> str | None:
    """Join ``address`` (or ``RAY_ADDRESS``), else start a local Ray in-process.

    Returns the dashboard's ``host:port`` when one is running (also when this process was
    already connected). A local Ray listens on 127.0.0.1 only (dashboard, job server,
    metrics, gRPC); expose it deliberately (see README). Keep the dashboard: it serves the
    State API, without which Ray Train's placement-group cleaner cannot tell that a stopped
    Tune trial's trainer died, so its CPUs leak and the next trial never schedules.

    ``log_to_driver`` copies every worker's stdout and stderr to this console (each worker's
    metric dict at each report, Ray Data's plans); off, they stay in the session's log files,
    and what fails still reaches the driver as the exception Ray raises there.
    """
    if ray.is_initialized():
        return dashboard_address()
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        return _join(address, log_to_driver)
    kwargs: dict[str, object] = {
        "num_cpus": num_cpus,
        "num_gpus": num_gpus,
        "include_dashboard": include_dashboard,
        "dashboard_host": "127.0.0.1",
        "log_to_driver": log_to_driver,
        "_system_config": _worker_pool_config(num_cpus or os.cpu_count() or 1),
    }
    if metrics_export_port is not None:  # where Prometheus scrapes this node
        kwargs["_metrics_export_port"] = metrics_export_port
    if temp_dir is not None:
        kwargs["_temp_dir"] = str(Path(temp_dir).resolve())
    with one_local_start_at_a_time():
        if include_dashboard:
            kwargs.update(_state_api_of_this_cluster())
        with _loopback_node():
            return ray.init(**kwargs).dashboard_url or None


LOCAL_START_LOCK = Path(tempfile.gettempdir()) / "matsci-ray-local-start.lock"


@contextmanager
def one_local_start_at_a_time() -> Iterator[None]:
    """Choose the dashboard's port and bind it under one lock per machine. Two drivers
    starting local Rays at once (two commands, two test workers) both found Ray's usual port
    free, and the second to bind it failed ("address already in use"); in turn, the second
    finds it taken and picks another. Without a usable lock file, no lock."""
    try:
        fd = os.open(LOCAL_START_LOCK, os.O_RDONLY | os.O_CREAT, 0o644)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _join(address: str, log_to_driver: bool) -> str | None:
    """Connect to the cluster at ``address``; one line naming it and what to do, instead of
    Ray's traceback, when it cannot be reached or refuses this client."""
    from ray.exceptions import AuthenticationError

    if _is_host_port(address):
        _probe(address)
        _probe_token(address)
    try:
        return ray.init(address=address, log_to_driver=log_to_driver).dashboard_url or None
    except (ConnectionError, AuthenticationError, TimeoutError) as error:
        raise _refused(address, error) from None


def _refused(address: str, error: Exception) -> ClusterError:
    """The error for a cluster that answers at ``address`` but refuses this client."""
    # Ray's ConnectionError does not say that the GCS refused this client for its token,
    # only its C++ log lines do.
    said = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if os.environ.get("RAY_AUTH_MODE") == "token":
        hint = "the cluster refused this client's token: is it the head's token file?"
    else:
        hint = (
            "a cluster with token authentication (every cluster/ set-up) needs "
            "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH=<the head's token file> "
            "(cluster/README.md, Authentication)"
        )
    return ClusterError(
        f"cannot join the Ray cluster at {address}: something answers there, but {hint} ({said})"
    )


def _is_host_port(address: str) -> bool:
    """``host:port``, not "auto" or "ray://...", which Ray resolves itself."""
    _, sep, port = address.rpartition(":")
    return bool(sep) and port.isdigit() and "://" not in address


def _probe(address: str, timeout_s: float = 5.0) -> None:
    """Fail at once when nothing listens at a ``host:port`` address: Ray's own join retries
    a silent address for many minutes before it gives up."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as error:
        raise ClusterError(
            f"cannot join the Ray cluster at {address}: nothing answers there ({error}); "
            "is a head running, and is the address host:port of its GCS?"
        ) from None


def _probe_token(address: str) -> None:
    """Fail at once when the GCS at ``address`` refuses this client's token: ``ray.init``
    asks again every second for 20 s, a line of Ray's log each time, before it gives up.
    Any other failure is left to ``ray.init``, which retries what may pass."""
    from ray._raylet import GcsClient
    from ray.exceptions import AuthenticationError

    try:
        GcsClient(address=address)  # asks the GCS for the cluster's ID, with the token
    except AuthenticationError as error:
        raise _refused(address, error) from None
    except Exception:
        return  # not this probe's to report


def _worker_pool_config(cpus: int) -> dict[str, int]:
    """Ray kills idle workers beyond ``num_workers_soft_limit`` (default: the CPU count, which
    Ray Train's own actors exceed on a small node), so every Ray Data execution re-spawned
    workers that re-import torch: a stall of seconds per epoch (benchmarks/README.md). Keep
    them alive. The raylet warns ("N PYTHON worker processes have been started", on every
    driver's console) at 4x, 5x, ... its startup concurrency (default: the CPU count), so on
    a small node the pool kept on purpose set it off several times a run; with half the pool
    starting at once, it warns only for twice the pool."""
    soft_limit = max(16, 4 * cpus)
    return {
        "num_workers_soft_limit": soft_limit,
        "worker_maximum_startup_concurrency": max(cpus, soft_limit // 2),
    }


def _state_api_of_this_cluster() -> dict[str, object]:
    """A dashboard port chosen here, and every worker of this driver told where it is.

    Ray Train's placement-group cleaner (an actor) asks the State API whether a trainer died
    and finds the API by looking for a Ray on the machine; with two local clusters (a second
    user, a test run beside another) it finds both, gives up, and a stopped Tune trial's CPUs
    are never freed: the next trial waits for ever. ``RAY_API_SERVER_ADDRESS``, which the
    State API reads first, names this cluster's.

    ``MATSCI_RAY_DASHBOARD_PORT`` (as for cluster/start-head.sh) fixes the port; otherwise
    Ray's usual one when free, else any free one."""
    fixed = os.environ.get(DASHBOARD_PORT_VARIABLE, "")
    if fixed and not fixed.isdigit():
        raise ClusterError(f"{DASHBOARD_PORT_VARIABLE}={fixed!r} is not a port number")
    port = int(fixed) if fixed else free_port(ray_constants.DEFAULT_DASHBOARD_PORT)
    api = ray_constants.RAY_API_SERVER_ADDRESS_ENVIRONMENT_VARIABLE
    return {
        "dashboard_port": port,
        "runtime_env": {"env_vars": {api: f"http://127.0.0.1:{port}"}},
    }


def free_port(preferred: int) -> int:
    """``preferred`` (Ray's usual dashboard port) when it is free on loopback, else any."""
    for port in (preferred, 0):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return probe.getsockname()[1]
    raise OSError("no free port on 127.0.0.1")


def dashboard_address() -> str | None:
    """``host:port`` of the dashboard of the Ray this process is connected to, or None."""
    if not ray.is_initialized():
        return None
    # Ray 2.60 has no public getter; ray.init's return value has it only for its caller
    from ray._private.worker import get_dashboard_url

    url = get_dashboard_url() or ""
    return url.removeprefix("http://").removeprefix("https://") or None


def session_logs() -> Path | None:
    """The log directory of this node's Ray session (every worker's stdout and stderr)."""
    node = getattr(ray._private.worker, "_global_node", None)
    return Path(node.get_logs_dir_path()) if node is not None else None


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
