"""``ray job submit`` against a real head (``ray start --head``): a training job and a sweep
job run to SUCCEEDED, their logs and results are read back, and the platform's own metrics
appear at the head's Prometheus endpoint while training runs.

The head binds its dashboard/job server to 127.0.0.1, keeps every file in this test's temp
dir, and is stopped by killing exactly its own processes (``ray stop`` would also stop any
other Ray on the machine).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import yaml

from matsci_ray.train.telemetry import EXPORTED_METRICS
from tests.cluster import free_ports
from tests.conftest import no_local_ray
from tests.samples import TINY_EGNN, ingest_in_process

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


class Head:
    def __init__(self, temp: Path) -> None:
        self.temp = temp
        gcs, dash, metrics, client, agent, grpc, env_agent = free_ports(7)
        self.dashboard = f"http://127.0.0.1:{dash}"
        self.metrics = f"http://127.0.0.1:{metrics}/metrics"
        self.env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
            "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_DATA_USE_DATASOURCE_V2": "0",
            "RAY_num_workers_soft_limit": "16",  # as cluster/start-head.sh sets it
            "RAY_metrics_report_interval_ms": "1000",  # export within a short test run
            # as init_ray and cluster/start-head.sh do: the State API of this cluster, not of
            # another one on the machine (the session's own Ray under pytest-xdist)
            "RAY_API_SERVER_ADDRESS": self.dashboard,
        }
        self.env.pop("RAY_ADDRESS", None)
        args = [
            RAY, "start", "--head", f"--port={gcs}", "--num-cpus=2", "--num-gpus=0",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
            f"--metrics-export-port={metrics}", f"--ray-client-server-port={client}",
            f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={grpc}",
            f"--runtime-env-agent-port={env_agent}", f"--temp-dir={temp}",
            "--disable-usage-stats",
        ]  # fmt: skip
        subprocess.run(args, env=self.env, check=True, capture_output=True, timeout=120)

    def submit(self, job_id: str, *entrypoint: str) -> None:
        subprocess.run(
            [RAY, "job", "submit", "--address", self.dashboard, "--working-dir", str(REPO),
             "--submission-id", job_id, "--no-wait", "--", *entrypoint],
            env=self.env, check=True, capture_output=True, timeout=120,
        )  # fmt: skip

    def stop(self) -> None:
        mine = []
        for proc in psutil.process_iter(["cmdline"]):
            if any(str(self.temp) in part for part in proc.info["cmdline"] or []):
                mine.append(proc)
        for proc in mine:
            proc.kill()
        psutil.wait_procs(mine, timeout=30)


pytestmark = pytest.mark.slow  # a cluster started with `ray start`, jobs submitted to it


@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    # short: Ray's socket paths under the temp dir must stay below 108 characters
    temp = Path(tempfile.mkdtemp(prefix="mrjob", dir="/tmp"))
    with no_local_ray():  # one Ray cluster on the machine at a time
        started = Head(temp)
        try:
            yield started
        finally:
            started.stop()


@pytest.fixture(scope="module")
def mp_root(samples: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = samples / "materials_project" / "summary_docs.jsonl"
    return ingest_in_process("materials-project", source, tmp_path_factory.mktemp("data"))


def _experiment(root: Path, storage: Path, epochs: int) -> dict:
    return {
        "name": "job-mp",
        "tasks": ["mp-formation-energy"],
        "data": {"root": str(root), "cutoff": 4.0, "batch_size": 16},
        "model": {"name": "egnn", "params": TINY_EGNN, "head_hidden": 16},
        "optim": {"lr": 3e-3, "epochs": epochs},
        "run": {"num_workers": 2, "cpus_per_worker": 0.5, "storage": str(storage)},
    }


def _wait(head: Head, job_id: str, timeout: float = 500, poll: Callable | None = None) -> str:
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(head.dashboard)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get_job_status(job_id)
        if poll is not None:
            poll()
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            logs = client.get_job_logs(job_id)
            assert status == JobStatus.SUCCEEDED, logs[-3000:]
            return logs
        time.sleep(1)
    raise AssertionError(f"{job_id} still {status} after {timeout} s")


def test_training_job_succeeds_and_exports_metrics(
    head: Head, mp_root: Path, tmp_path: Path
) -> None:
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(_experiment(mp_root, tmp_path / "runs", epochs=8)))
    head.submit("train-1", "python", "jobs/single_task.py", str(config))

    scraped: set[str] = set()

    def scrape() -> None:  # the gauges exist only while the trainer's workers are alive
        try:
            text = urllib.request.urlopen(head.metrics, timeout=5).read().decode()
        except OSError:
            return
        scraped.update(m for m in EXPORTED_METRICS if f"ray_{m}{{" in text and "job-mp" in text)

    logs = _wait(head, "train-1", poll=scrape)
    assert "checkpoint:" in logs and "val/mp-formation-energy/mse" in logs
    history = [
        json.loads(x) for x in (tmp_path / "runs/job-mp/history.jsonl").read_text().splitlines()
    ]
    assert [row["epoch"] for row in history] == list(range(1, 9))
    start = logs.index("\n{\n")  # the CLI prints the final metrics as indented JSON
    printed = json.loads(logs[start : logs.index("\n}\n", start) + 3])
    assert printed["val/mp-formation-energy/mse"] == history[-1]["val/mp-formation-energy/mse"]
    assert scraped == set(EXPORTED_METRICS), (
        f"missing at {head.metrics}: {set(EXPORTED_METRICS) - scraped}"
    )


def test_sweep_job_succeeds(head: Head, mp_root: Path, tmp_path: Path) -> None:
    """The sweep entrypoint as a job, one trial (test_demo samples two with Optuna)."""
    study = {
        "name": "job-sweep",
        "family": "sweep",
        "sweep": {"num_samples": 1, "lr": [1e-3, 3e-3], "width": [8, 16], "depth": [1],
                  "cutoff": [4.0, 5.0], "grace_period": 1},
        "base": _experiment(mp_root, tmp_path / "studies", epochs=2),
    }  # fmt: skip
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(study))
    head.submit("sweep-1", "python", "jobs/sweep.py", str(config))
    _wait(head, "sweep-1")
    trials = [
        json.loads(x)
        for x in (tmp_path / "studies/job-sweep/trials.jsonl").read_text().split("\n")
        if x
    ]
    assert len(trials) == 1 and trials[0]["error"] is None
    assert trials[0]["metrics"]["epoch"] == 2
