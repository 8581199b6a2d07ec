"""A Ray cluster of several nodes on this machine, for tests (a helper, not a test module).

Each node is ``cluster/start-head.sh`` or ``cluster/start-worker.sh`` with ``--block``: one
``ray start`` in its own process group (session), temp dir and free ports. Killing a node
SIGKILLs that group (raylet, object store, agents) and the node's Ray workers, which Ray puts in
process groups of their own; every process a node starts inherits a marker naming the node, so
exactly that node's processes die, as when a machine is lost. Teardown kills what this harness
started that way, never ``ray stop``, which would end every Ray on the machine. Token
authentication is on, as on a real cluster; the token lives in the cluster's temp dir and
:meth:`LocalCluster.client_env` hands it to client processes.

    with local_cluster({"a": {"node_a": 1}, "b": {"node_b": 1}}) as cluster:
        subprocess.run([sys.executable, "client.py", cluster.address], env=cluster.client_env())
        cluster.kill_node("a")
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "cluster"
# Every process a node starts inherits this variable (Ray workers rename themselves and leave
# the node's process group, so neither command line nor group tells whose they are); its
# value is the node's temp dir.
MARKER = "MATSCI_RAY_TEST_NODE"
# Settings of the calling process that would leak into the nodes or clients: the scripts and
# the harness set these explicitly (tests/conftest.py turns auth off for the in-process Ray).
_INHERITED_OUT = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
# The GCS declares a killed node dead after 5 failed checks 1 s apart instead of 3 s apart
# (a dead raylet refuses at once); a live but slow one still has 3 s to answer each.
_FAST_FAILURE_DETECTION = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "3000",
    "RAY_health_check_failure_threshold": "5",
}
_STARTED = "Ray runtime started"


class ClusterError(RuntimeError):
    """A node did not come up, or the cluster did not reach the state a test waits for."""


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports nothing listens on now: the OS's choice, all held open
    until every one is chosen, so no two are the same (a race with other processes is
    accepted)."""
    with ExitStack() as held:
        sockets = [held.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


def _base_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in _INHERITED_OUT and not k.startswith("MATSCI_RAY_")
    }
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _marked_pids(value: str, *, prefix: bool = False) -> list[int]:
    """PIDs of live processes whose environment sets ``MARKER`` to ``value`` (or, with
    ``prefix``, to anything starting with it)."""
    needle = f"{MARKER}={value}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with suppress(OSError):
            entries = (proc / "environ").read_bytes().split(b"\0")
            if any(e == needle or (prefix and e.startswith(needle)) for e in entries):
                stat = (proc / "stat").read_text()
                if stat.rsplit(")", 1)[1].split()[0] != "Z":  # zombies hold nothing
                    found.append(int(proc.name))
    return found


def _kill_all(pids: list[int]) -> None:
    for pid in pids:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@dataclass
class Node:
    """One ``ray start --block`` (its process group) and every process started under it."""

    name: str
    process: subprocess.Popen[bytes]
    temp_dir: Path
    resources: dict[str, float] = field(default_factory=dict)

    @property
    def log(self) -> Path:
        return self.temp_dir / "start.log"

    def log_tail(self, chars: int = 3000) -> str:
        with suppress(OSError):
            return self.log.read_text(errors="replace")[-chars:]
        return ""

    def wait_started(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _STARTED in self.log_tail(100_000):
                return
            if self.process.poll() is not None:
                raise ClusterError(f"node {self.name} exited:\n{self.log_tail()}")
            time.sleep(0.3)
        raise ClusterError(f"node {self.name} not started in {timeout:.0f} s:\n{self.log_tail()}")

    def processes(self) -> list[int]:
        """PIDs of every live process this node started (any depth, any process group)."""
        return _marked_pids(str(self.temp_dir))

    def kill(self, timeout: float = 30.0) -> None:
        """SIGKILL the node's process group and its Ray workers (in groups of their own), and
        wait until all are gone."""
        pgid = self.process.pid  # start_new_session: the leader's PID is the group's ID
        with suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        _kill_all(self.processes())
        self.process.wait(timeout)
        deadline = time.monotonic() + timeout
        while _group_alive(pgid) or self.processes():
            if time.monotonic() > deadline:
                raise ClusterError(f"node {self.name}: processes outlived SIGKILL")
            _kill_all(self.processes())  # a worker forked while the first kill went round
            time.sleep(0.1)


class LocalCluster:
    """A head with no CPUs plus worker nodes, all on this machine; see the module docstring."""

    def __init__(self, root: Path, *, object_store_mb: int = 256) -> None:
        self.root = root
        self.object_store_mb = object_store_mb
        self.token_file = root / "token"
        self.gcs_port = self.dashboard_port = 0  # chosen when the head starts
        self.head: Node | None = None
        self.nodes: dict[str, Node] = {}
        self.strays: list[int] = []  # processes alive after shutdown killed every node

    @property
    def address(self) -> str:
        """The GCS address for ``ray.init(address=...)`` and ``ray start --address``."""
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        """The job API, for ``ray job submit --address``."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    def client_env(self, *, token: bool = True) -> dict[str, str]:
        """Environment for a client process (driver, ``ray job submit``): with the cluster's
        token, or (``token=False``) with authentication off, as a stranger would connect."""
        env = _base_env()
        if token:
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_file))
        else:
            env["RAY_AUTH_MODE"] = "disabled"
        return env

    def _node_env(self, name: str, ports: Mapping[str, int], cpus: int) -> dict[str, str]:
        env = _base_env()
        env.update(
            {
                MARKER: str(self.root / name),
                "MATSCI_RAY_AUTH": "token",
                "RAY_AUTH_TOKEN_PATH": str(self.token_file),
                "MATSCI_RAY_NUM_CPUS": str(cpus),
                "MATSCI_RAY_NUM_GPUS": "0",
                **{key: str(port) for key, port in ports.items()},
            }
        )
        return env

    def _start(
        self,
        name: str,
        script: list[str],
        env: Callable[[], dict[str, str]],
        resources: Mapping[str, float],
        timeout: float,
    ) -> Node:
        """Start a node, and once more if it fails: on a loaded machine a raylet can miss the
        30 s Ray gives it (fixed) to register. ``env`` makes the environment with fresh ports."""
        try:
            return self._start_once(name, script, env(), resources, timeout)
        except ClusterError:
            return self._start_once(name, script, env(), resources, timeout)

    def _start_once(
        self,
        name: str,
        script: list[str],
        env: dict[str, str],
        resources: Mapping[str, float],
        timeout: float,
    ) -> Node:
        temp_dir = self.root / name
        temp_dir.mkdir(exist_ok=True)  # a killed node's name may come back
        args = [
            *script,
            "--block",
            "--temp-dir",
            str(temp_dir),
            "--object-store-memory",
            str(self.object_store_mb * 2**20),
            "--disable-usage-stats",
        ]
        if resources:
            args += ["--resources", json.dumps(dict(resources))]
        with (temp_dir / "start.log").open("wb") as log:
            process = subprocess.Popen(
                ["bash", *args],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: killing it ends this node only
            )
        node = Node(name, process, temp_dir, dict(resources))
        try:
            node.wait_started(timeout)
        except ClusterError:
            node.kill()
            shutil.rmtree(temp_dir, ignore_errors=True)
            raise
        return node

    def _head_env(self) -> dict[str, str]:
        names = (
            "MATSCI_RAY_PORT",
            "MATSCI_RAY_DASHBOARD_PORT",
            "MATSCI_RAY_CLIENT_PORT",
            "MATSCI_RAY_METRICS_PORT",
            "MATSCI_RAY_AGENT_PORT",
            "DASHBOARD_METRIC_PORT",
        )
        ports = dict(zip(names, free_ports(len(names)), strict=True))
        self.gcs_port, self.dashboard_port = ports["MATSCI_RAY_PORT"], ports[names[1]]
        return {**self._node_env("head", ports, cpus=0), **_FAST_FAILURE_DETECTION}

    def start_head(self, timeout: float = 180.0) -> Node:
        script = [str(SCRIPTS / "start-head.sh")]
        self.head = self._start("head", script, self._head_env, {}, timeout)
        return self.head

    def add_node(
        self,
        name: str,
        resources: Mapping[str, float] | None = None,
        *,
        num_cpus: int = 1,
        timeout: float = 180.0,
    ) -> Node:
        """Start a worker node offering ``num_cpus`` CPUs and ``resources``."""
        if name in self.nodes or name == "head":
            raise ValueError(f"node {name!r} exists")

        def env() -> dict[str, str]:
            names = ("MATSCI_RAY_METRICS_PORT", "MATSCI_RAY_AGENT_PORT")
            ports = dict(zip(names, free_ports(len(names)), strict=True))
            return self._node_env(name, ports, num_cpus)

        script = [str(SCRIPTS / "start-worker.sh"), self.address]
        self.nodes[name] = self._start(name, script, env, resources or {}, timeout)
        return self.nodes[name]

    def kill_node(self, name: str) -> None:
        """Lose a node as a machine is lost: SIGKILL its raylet and every process under it."""
        self.nodes.pop(name).kill()

    def run_client(
        self,
        code: str,
        *,
        token: bool = True,
        timeout: float = 180.0,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run Python ``code`` in a fresh client process (``env`` added to its environment);
        ``ADDRESS`` holds the GCS address."""
        program = f"ADDRESS = {self.address!r}\n{textwrap.dedent(code)}"
        return subprocess.run(
            [sys.executable, "-c", program],
            env={**self.client_env(token=token), **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def alive_nodes(self, *, expect: int | None = None, timeout: float = 120.0) -> list[dict]:
        """``ray.nodes()`` entries of the live worker nodes (the head excluded), read by a
        client; with ``expect``, waits until that many are alive."""
        code = f"""
            import json, time, ray
            ray.init(address=ADDRESS, log_to_driver=False)
            expect, deadline = {expect!r}, time.monotonic() + {timeout}
            while True:
                nodes = [n for n in ray.nodes() if n["Alive"]
                         and "node:__internal_head__" not in n["Resources"]]
                if expect is None or len(nodes) == expect or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            print("NODES=" + json.dumps(nodes))
        """
        result = self.run_client(code, timeout=timeout + 120)
        lines = [ln for ln in result.stdout.splitlines() if ln.startswith("NODES=")]
        if result.returncode or not lines:
            raise ClusterError(f"client failed:\n{result.stdout[-2000:]}{result.stderr[-3000:]}")
        nodes: list[dict] = json.loads(lines[-1].removeprefix("NODES="))
        if expect is not None and len(nodes) != expect:
            raise ClusterError(f"{len(nodes)} worker nodes alive, not {expect}, in {timeout} s")
        return nodes

    def processes(self) -> list[int]:
        """PIDs of every live process this cluster started (any node, any depth)."""
        return _marked_pids(f"{self.root}/", prefix=True)

    def shutdown(self) -> None:
        """Kill every node, worker nodes first; then kill, and record in :attr:`strays`, any
        process of this cluster still alive (a node's kill missed it: none should be);
        remove the temp dirs."""
        for node in [*self.nodes.values(), *([self.head] if self.head else [])]:
            node.kill()
        self.nodes.clear()
        self.head = None
        self.strays = self.processes()
        _kill_all(self.strays)
        shutil.rmtree(self.root, ignore_errors=True)


@contextmanager
def local_cluster(
    nodes: Mapping[str, Mapping[str, float]] | None = None,
    *,
    num_cpus: int = 1,
    object_store_mb: int = 256,
) -> Iterator[LocalCluster]:
    """A running head plus one worker node per entry of ``nodes`` (name -> custom resources,
    each node offering ``num_cpus`` CPUs); torn down on exit, whatever happened."""
    # Short root under /tmp: Ray's Unix socket paths live below it and must stay < 108 bytes.
    cluster = LocalCluster(
        Path(tempfile.mkdtemp(prefix="mr", dir="/tmp")), object_store_mb=object_store_mb
    )
    try:
        cluster.start_head()
        for name, resources in (nodes or {}).items():
            cluster.add_node(name, resources, num_cpus=num_cpus)
        yield cluster
    finally:
        cluster.shutdown()
