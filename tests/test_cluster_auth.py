"""Real clusters from cluster/start-head.sh and start-worker.sh on 127.0.0.1 (tests/cluster.py):
token authentication keeps out clients without the token, and the multi-node harness starts,
loses, adds and tears down nodes by the processes it started."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster import LocalCluster, local_cluster

pytestmark = pytest.mark.slow  # each test starts a Ray cluster of its own (~1 min on 2 cores)

RAY = str(Path(sys.executable).parent / "ray")
REFUSED = "Authentication token is missing or incorrect"  # the GCS's answer to a client
RAY_JOIN_TRIES = "RAY_gcs_server_port_wait_time_s"  # a joining client's tries, a second apart
ASKED_AGAIN = "Failed to get cluster ID from GCS server"  # Ray's log line at each refused try


def _submit(cluster: LocalCluster, env: dict[str, str], *entrypoint: str) -> tuple[int, str]:
    """`ray job submit` to the cluster's job API; (exit code, all output)."""
    result = subprocess.run(
        [RAY, "job", "submit", "--address", cluster.dashboard_url, "--", *entrypoint],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return result.returncode, result.stdout + result.stderr


def test_head_refuses_clients_and_jobs_without_the_token() -> None:
    with local_cluster() as cluster:
        assert cluster.head is not None
        assert cluster.token_file.stat().st_mode & 0o777 == 0o600
        assert re.fullmatch(r"[0-9a-f]{64}", cluster.token_file.read_text())
        assert "export RAY_AUTH_MODE=token" in cluster.head.log_tail()  # the hand-off

        code, out = _submit(cluster, cluster.client_env(token=False), "echo", "ran")
        assert code != 0 and "Missing authentication token" in out, out
        wrong = {**cluster.client_env(), "RAY_AUTH_TOKEN": "0" * 64}  # beats the token file
        code, out = _submit(cluster, wrong, "echo", "ran")
        assert code != 0 and "Invalid authentication token" in out, out

        # the job's driver runs on the head and reaches the GCS with the head's token
        driver = "import ray; ray.init(); print('driver', ray.is_initialized())"
        code, out = _submit(cluster, cluster.client_env(), "python", "-c", driver)
        assert code == 0 and "driver True" in out, out

        connect = "import ray\nray.init(address=ADDRESS)\nprint('CONNECTED')"
        # Ray asks a refusing GCS again every second for 20 s; 2 tries say the same here
        refused = cluster.run_client(connect, token=False, env={RAY_JOIN_TRIES: "2"})
        assert refused.returncode != 0 and "CONNECTED" not in refused.stdout
        assert REFUSED in refused.stderr, refused.stderr[-3000:]
        accepted = cluster.run_client(connect)
        assert accepted.returncode == 0 and "CONNECTED" in accepted.stdout, accepted.stderr

        # matsci-ray's own join (every command's --address): one line that names the fix
        join = """
            from matsci_ray.errors import ClusterError
            from matsci_ray.ray_env import init_ray
            try:
                init_ray(ADDRESS)
            except ClusterError as error:
                print("REFUSED:", error)
            """
        joined = cluster.run_client(join, token=False)
        [line] = [x for x in joined.stdout.splitlines() if x.startswith("REFUSED:")]
        assert cluster.address in line and "RAY_AUTH_TOKEN_PATH" in line, joined.stdout
        # refused at the first answer, not after Ray's 20 tries
        assert joined.stderr.count(ASKED_AGAIN) <= 1, joined.stderr[-3000:]
        wrong_token = cluster.run_client(join, env={"RAY_AUTH_TOKEN": "0" * 64})
        [line] = [x for x in wrong_token.stdout.splitlines() if x.startswith("REFUSED:")]
        assert "refused this client's token" in line, wrong_token.stdout


def _worker_of_each_node(cluster: LocalCluster, names: list[str]) -> dict[str, int]:
    """Start a detached actor on each named node (pinned by its resource), which outlives this
    client as a worker process would a job; the PID of each actor's worker."""
    code = f"""
        import os, ray
        ray.init(address=ADDRESS, log_to_driver=False)

        @ray.remote(num_cpus=1)
        class Pid:
            def pid(self):
                return os.getpid()

        for name in {names!r}:
            actor = Pid.options(resources={{"node_" + name: 1}}, lifetime="detached").remote()
            print("WORKER", name, ray.get(actor.pid.remote()))
    """
    result = cluster.run_client(code)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split()[1:] for line in result.stdout.splitlines() if line.startswith("WORKER ")]
    return {name: int(pid) for name, pid in rows}


def _custom_resources(nodes: list[dict]) -> list[str]:
    return sorted(key for n in nodes for key in n["Resources"] if key.startswith("node_"))


def test_harness_nodes_come_up_die_join_and_leave_no_process() -> None:
    with local_cluster({"a": {"node_a": 1}, "b": {"node_b": 1}}) as cluster:
        nodes = cluster.alive_nodes(expect=2)
        assert _custom_resources(nodes) == ["node_a", "node_b"]
        assert all(n["Resources"]["CPU"] == 1 for n in nodes)

        # the harness knows each node's processes, Ray workers (own process groups) included
        workers = _worker_of_each_node(cluster, ["a", "b"])
        node_a, node_b = cluster.nodes["a"], cluster.nodes["b"]
        assert workers["a"] in node_a.processes() and workers["b"] in node_b.processes()
        assert os.getpgid(workers["a"]) != node_a.process.pid  # why groups alone do not do
        b_pids = node_b.processes()
        assert not set(node_a.processes()) & set(b_pids)

        cluster.kill_node("a")
        assert node_a.processes() == [] and set(b_pids) <= set(node_b.processes())
        (left,) = cluster.alive_nodes(expect=1)
        assert _custom_resources([left]) == ["node_b"]

        cluster.add_node("c", {"node_c": 1})
        assert _custom_resources(cluster.alive_nodes(expect=2)) == ["node_b", "node_c"]

    assert cluster.strays == [], "a node's kill missed some of its processes"
    assert cluster.processes() == [] and not cluster.root.exists()
