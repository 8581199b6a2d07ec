"""cluster/'s bare-machine scripts (start-head.sh, start-worker.sh, new-token.sh and the
common.sh they source): they parse, bind to loopback unless told, take every port from the
environment, and make, check and demand the cluster's token. Each runs against a stand-in
`ray` on PATH that records its arguments and environment instead of starting Ray."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
SCRIPTS = [CLUSTER / "start-head.sh", CLUSTER / "start-worker.sh", CLUSTER / "new-token.sh"]
SHARED_SH = CLUSTER / "common.sh"  # sourced by the scripts
GCS_PORT, METRICS_PORT = "6379", "8080"  # Ray's defaults, as in the launcher and KubeRay files


@pytest.mark.parametrize("script", [*SCRIPTS, SHARED_SH], ids=lambda p: p.name)
def test_scripts_parse(script: Path) -> None:
    text = script.read_text()
    if script != SHARED_SH:
        assert os.access(script, os.X_OK), f"{script.name} is not executable"
        assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
    subprocess.run(["bash", "-n", str(script)], check=True)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", "-x", str(script)], check=True)


@dataclass
class Started:
    """What a script handed to `ray`: its arguments and the auth environment."""

    argv: list[str]
    env: dict[str, str]
    stderr: str

    @property
    def flags(self) -> dict[str, str]:
        argv = self.argv
        return {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("--")}


_RECORDED = (
    "RAY_AUTH_MODE",
    "RAY_AUTH_TOKEN_PATH",
    "RAY_num_workers_soft_limit",
    "RAY_API_SERVER_ADDRESS",
)


def _run_script(
    tmp_path: Path, script: Path, *args: str, code: int = 0, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run ``script`` with HOME in ``tmp_path`` and a `ray` on PATH that records its arguments
    and environment in ``$OUT`` instead of starting; assert its exit code."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "ray"
    lines = "".join(f'"{k}=${{{k}:-}}" ' for k in _RECORDED)
    fake.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" -- {lines}> "$OUT"\n')
    fake.chmod(0o755)
    (tmp_path / "home").mkdir(exist_ok=True)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MATSCI_RAY_", "RAY_"))}
    run_env = {
        **base,
        "HOME": str(tmp_path / "home"),
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "OUT": str(tmp_path / "args.txt"),
        **env,
    }
    result = subprocess.run(
        ["bash", str(script), *args], env=run_env, capture_output=True, text=True, check=False
    )
    assert result.returncode == code, result.stderr
    return result


def _start(tmp_path: Path, script: Path, *args: str, **env: str) -> Started:
    result = _run_script(tmp_path, script, *args, **env)
    out = (tmp_path / "args.txt").read_text().splitlines()
    cut = out.index("--")
    recorded = dict(line.split("=", 1) for line in out[cut + 1 :])
    return Started(out[:cut], recorded, result.stderr)


def _token(tmp_path: Path, mode: int = 0o600, name: str = "token") -> Path:
    path = tmp_path / name
    path.write_text("f" * 64)
    path.chmod(mode)
    return path


def test_start_head_binds_loopback_unless_told(tmp_path: Path) -> None:
    started = _start(tmp_path, CLUSTER / "start-head.sh")
    flags = started.flags
    assert started.argv[0] == "start" and "--head" in started.argv
    assert flags["--dashboard-host"] == "127.0.0.1"
    assert flags["--port"] == GCS_PORT and flags["--metrics-export-port"] == METRICS_PORT
    assert int(started.env["RAY_num_workers_soft_limit"]) >= 16
    told = _start(tmp_path, CLUSTER / "start-head.sh", MATSCI_RAY_DASHBOARD_HOST="10.0.0.5")
    assert told.flags["--dashboard-host"] == "10.0.0.5"
    assert "warning: the job API on 10.0.0.5:8265" in told.stderr


def test_start_head_makes_a_private_token_once(tmp_path: Path) -> None:
    token = tmp_path / "home" / ".ray" / "auth_token"  # Ray's default path
    first = _start(tmp_path, CLUSTER / "start-head.sh")
    assert first.env == {**first.env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    assert token.stat().st_mode & 0o777 == 0o600
    assert re.fullmatch(r"[0-9a-f]{64}", token.read_text())
    assert f"generated a new Ray auth token in {token}" in first.stderr
    assert "export RAY_AUTH_MODE=token" in first.stderr  # how clients and workers get it
    assert f"scp -p {token} WORKER:.ray/" in first.stderr
    value = token.read_text()
    second = _start(tmp_path, CLUSTER / "start-head.sh")
    assert token.read_text() == value and "generated" not in second.stderr

    elsewhere = tmp_path / "keys" / "cluster.token"
    third = _start(tmp_path, CLUSTER / "start-head.sh", RAY_AUTH_TOKEN_PATH=str(elsewhere))
    assert third.env["RAY_AUTH_TOKEN_PATH"] == str(elsewhere) and elsewhere.read_text() != value


def test_start_scripts_take_every_port_from_the_environment(tmp_path: Path) -> None:
    ports = {
        "MATSCI_RAY_PORT": ("--port", "16379"),
        "MATSCI_RAY_DASHBOARD_PORT": ("--dashboard-port", "18265"),
        "MATSCI_RAY_METRICS_PORT": ("--metrics-export-port", "18080"),
        "MATSCI_RAY_CLIENT_PORT": ("--ray-client-server-port", "20001"),
        "MATSCI_RAY_AGENT_PORT": ("--dashboard-agent-listen-port", "22365"),
    }
    env = {name: port for name, (_, port) in ports.items()}
    head = _start(tmp_path, CLUSTER / "start-head.sh", **env)
    assert {flag: head.flags[flag] for flag, _ in ports.values()} == dict(ports.values())
    worker = _start(tmp_path, CLUSTER / "start-worker.sh", "h", **env)
    assert worker.flags["--metrics-export-port"] == "18080"
    assert worker.flags["--dashboard-agent-listen-port"] == "22365"
    defaults = _start(tmp_path, CLUSTER / "start-head.sh").flags
    assert defaults["--ray-client-server-port"] == "10001"
    assert defaults["--dashboard-port"] == "8265"


def test_start_head_names_its_own_state_api(tmp_path: Path) -> None:
    """Every process of the head asks this head's State API (Ray Train's placement-group
    cleaner does), not whichever Ray it would find first on a machine running two."""
    head = _start(tmp_path, CLUSTER / "start-head.sh", MATSCI_RAY_DASHBOARD_PORT="18265")
    assert head.env["RAY_API_SERVER_ADDRESS"] == "http://127.0.0.1:18265"


def test_start_worker_joins_the_head_with_the_token(tmp_path: Path) -> None:
    token = _token(tmp_path)
    started = _start(
        tmp_path,
        CLUSTER / "start-worker.sh",
        "head.example",
        MATSCI_RAY_NUM_GPUS="4",
        RAY_AUTH_TOKEN_PATH=str(token),
    )
    flags = started.flags
    assert flags["--address"] == f"head.example:{GCS_PORT}"
    assert flags["--num-gpus"] == "4" and flags["--metrics-export-port"] == METRICS_PORT
    assert "--dashboard-host" not in flags
    assert int(started.env["RAY_num_workers_soft_limit"]) >= 16
    assert started.env["RAY_AUTH_MODE"] == "token"
    assert started.env["RAY_AUTH_TOKEN_PATH"] == str(token)
    inline = _start(tmp_path, CLUSTER / "start-worker.sh", "h", RAY_AUTH_TOKEN="f" * 64)
    assert inline.env["RAY_AUTH_MODE"] == "token"


def _one_error_line(result: subprocess.CompletedProcess[str], *words: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert all(w in lines[0] for w in words), lines[0]


def test_scripts_refuse_a_missing_or_readable_token(tmp_path: Path) -> None:
    missing = _run_script(tmp_path, CLUSTER / "start-worker.sh", "h", code=2)
    _one_error_line(missing, "no Ray auth token at", "copy the head's token file")
    assert not (tmp_path / "args.txt").exists(), "ray started without a token"
    readable = _token(tmp_path, 0o644)
    for script, args in [("start-worker.sh", ["h"]), ("start-head.sh", [])]:
        result = _run_script(
            tmp_path, CLUSTER / script, *args, code=2, RAY_AUTH_TOKEN_PATH=str(readable)
        )
        _one_error_line(result, "mode 644", f"chmod 600 {readable}")


def test_auth_off_is_explicit_and_warned(tmp_path: Path) -> None:
    for script, args in [("start-head.sh", []), ("start-worker.sh", ["h"])]:
        started = _start(tmp_path, CLUSTER / script, *args, MATSCI_RAY_AUTH="off")
        assert started.env["RAY_AUTH_MODE"] == "disabled" and not started.env["RAY_AUTH_TOKEN_PATH"]
        assert "warning: MATSCI_RAY_AUTH=off" in started.stderr
    assert not (tmp_path / "home" / ".ray").exists(), "made a token with auth off"
    bad = _run_script(tmp_path, CLUSTER / "start-head.sh", code=2, MATSCI_RAY_AUTH="yes")
    _one_error_line(bad, "MATSCI_RAY_AUTH must be 'token'")


def test_new_token_makes_a_private_token_and_keeps_it(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dir" / "k.token"
    _run_script(tmp_path, CLUSTER / "new-token.sh", str(path))
    value = path.read_text()
    assert re.fullmatch(r"[0-9a-f]{64}", value) and path.stat().st_mode & 0o777 == 0o600
    kept = _run_script(tmp_path, CLUSTER / "new-token.sh", str(path))
    assert path.read_text() == value and "kept" in kept.stderr
    other = tmp_path / "other.token"
    _run_script(tmp_path, CLUSTER / "new-token.sh", str(other))
    assert other.read_text() != value
    _run_script(tmp_path, CLUSTER / "new-token.sh", code=2)
