"""The local Ray that the CLI, the demo and the tests start listens on loopback only."""

from __future__ import annotations

import ipaddress
import os

import psutil
import pytest


def _listening(pids: set[int]) -> list[tuple[int, str, str, int]]:
    """``(pid, process name, address, port)`` of every listening TCP socket of ``pids``."""
    found = []
    for conn in psutil.net_connections(kind="inet"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in pids:
            name = psutil.Process(conn.pid).name()
            found.append((conn.pid, name, conn.laddr.ip, conn.laddr.port))
    return found


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def test_every_listening_socket_of_the_local_ray_is_loopback(ray_local: None) -> None:
    import ray

    # a worker process and the metrics endpoint exist once a task has run
    @ray.remote(num_cpus=0.1)
    def pid() -> int:
        return os.getpid()

    ray.get([pid.remote() for _ in range(2)])
    ours = {os.getpid()} | {p.pid for p in psutil.Process().children(recursive=True)}
    sockets = _listening(ours)
    names = {name for _, name, _, _ in sockets}
    if not sockets:
        pytest.fail("no listening socket found: psutil cannot see this machine's sockets")
    assert {"gcs_server", "raylet"} <= names, names
    public = [s for s in sockets if not _is_loopback(s[2])]
    assert not public, f"listening beyond loopback: {public}"


def test_joining_again_gives_the_running_dashboard_and_its_logs(ray_local: None) -> None:
    """The demo prints the dashboard as soon as Ray is up, also when this process already
    had one (the tests' session Ray), and says where the workers' logs are."""
    from matsci_ray.ray_env import init_ray, session_logs

    address = init_ray()
    assert address is not None and address.startswith("127.0.0.1:")
    logs = session_logs()
    assert logs is not None and logs.is_dir() and any(logs.glob("raylet*"))


def test_dashboard_port_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """``MATSCI_RAY_DASHBOARD_PORT`` fixes a local Ray's dashboard port (pytest-xdist workers
    each take one), and its workers are told that this is their cluster's State API; a value
    that is no port is one line."""
    from matsci_ray.errors import ClusterError
    from matsci_ray.ray_env import DASHBOARD_PORT_VARIABLE, _state_api_of_this_cluster

    monkeypatch.setenv(DASHBOARD_PORT_VARIABLE, "18765")
    chosen = _state_api_of_this_cluster()
    assert chosen["dashboard_port"] == 18765
    assert chosen["runtime_env"] == {
        "env_vars": {"RAY_API_SERVER_ADDRESS": "http://127.0.0.1:18765"}
    }
    monkeypatch.setenv(DASHBOARD_PORT_VARIABLE, "eighty")
    with pytest.raises(ClusterError, match="MATSCI_RAY_DASHBOARD_PORT='eighty' is not a port"):
        _state_api_of_this_cluster()


def test_local_starts_on_one_machine_take_turns() -> None:
    """While one driver chooses and binds its dashboard port, another's start waits (two at
    once both took Ray's usual port, and the second failed to bind it)."""
    import subprocess
    import sys

    from matsci_ray.ray_env import LOCAL_START_LOCK, one_local_start_at_a_time

    try_lock = (
        "import fcntl, os, sys\n"
        f"fd = os.open({str(LOCAL_START_LOCK)!r}, os.O_RDONLY)\n"
        "try:\n"
        "    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
        "except BlockingIOError:\n"
        "    sys.exit(3)\n"
    )
    with one_local_start_at_a_time():
        held = subprocess.run([sys.executable, "-c", try_lock], timeout=60)
    free = subprocess.run([sys.executable, "-c", try_lock], timeout=60)
    assert (held.returncode, free.returncode) == (3, 0)
