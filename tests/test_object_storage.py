"""Data and runs on an object store: a real S3-compatible server (moto in server mode) on
127.0.0.1, reached through the same environment variables a user sets for S3 or MinIO."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from matsci_ray.cli.main import main
from matsci_ray.ray_env import free_port
from tests.conftest import no_local_ray, ray_temp_dir
from tests.samples import TINY_EGNN

moto_server = pytest.importorskip("moto.server", reason="pip install 'moto[server]'")

BUCKET = "matsci"
MP_DOCS = ("materials_project", "summary_docs.jsonl")


@pytest.fixture(scope="module")
def s3_env() -> Iterator[dict[str, str]]:
    """A moto S3 server with one bucket, and the environment that points at it (set for
    this module only)."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(0))
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        import pyarrow.fs as pafs

        fs = pafs.S3FileSystem(
            access_key="testing",
            secret_key="testing",
            region="us-east-1",
            endpoint_override=f"{host}:{port}",
            scheme="http",
            allow_bucket_creation=True,
        )
        fs.create_dir(BUCKET)
        yield env
    server.stop()


def _keys(prefix: str = "") -> list[str]:
    """Every object key in the bucket under ``prefix``."""
    import pyarrow.fs as pafs

    from matsci_ray.storage import Uri, filesystem

    fs, path = filesystem(Uri(f"s3://{BUCKET}/{prefix}".rstrip("/")))
    found = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return [i.path for i in found if i.type == pafs.FileType.File]


def _ingest_line(out: str, samples: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    docs = samples.joinpath(*MP_DOCS)
    code = main(["ingest", "materials-project", str(docs), "--out", out, "--no-progress"])
    return code, capsys.readouterr().err.strip()


# --- bad input: one line, exit 2, at once ------------------------------------------------


def test_missing_bucket_is_one_line(
    s3_env: dict[str, str], samples: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _ingest_line("s3://no-such-bucket/data", samples, capsys)
    assert code == 2
    assert err.count("\n") == 0
    assert "bucket 'no-such-bucket' does not exist" in err
    assert "s3://no-such-bucket" in err


def test_unreachable_endpoint_fails_fast(
    s3_env: dict[str, str],
    samples: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port(0)}")  # nothing there
    started = time.monotonic()
    code, err = _ingest_line(f"s3://{BUCKET}/data", samples, capsys)
    assert code == 2
    assert time.monotonic() - started < 10  # the SDK's retries would take far longer
    assert err.count("\n") == 0
    assert "cannot reach the object store at http://127.0.0.1:" in err


@pytest.mark.parametrize("keep", [None, "AWS_ACCESS_KEY_ID"])
def test_missing_credentials_are_one_line(
    keep: str | None,
    s3_env: dict[str, str],
    samples: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        if key != keep:
            monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    code, err = _ingest_line(f"s3://{BUCKET}/data", samples, capsys)
    assert code == 2
    assert err.count("\n") == 0
    if keep:
        assert "AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not" in err
    else:
        assert "no S3 credentials" in err


def test_locations_parse_and_join() -> None:
    from matsci_ray.storage import Uri, location

    uri = location("s3://Bucket/a/b/")
    assert isinstance(uri, Uri)
    assert str(uri / "c" / "d.json") == "s3://Bucket/a/b/c/d.json"
    assert uri.name == "b" and str(uri.parent) == "s3://Bucket/a"
    assert location("runs/x") == Path("runs/x")
    assert location("file:///tmp/x") == Path("/tmp/x")
    with pytest.raises(TypeError):
        os.fspath(uri)  # type: ignore[arg-type]  # never opened as a local file


# --- the whole flow on S3 ----------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_s3(s3_env: dict[str, str]) -> Iterator[None]:
    """A local Ray started with the S3 environment (its workers inherit it), the session's
    own Ray paused meanwhile."""
    import ray

    from matsci_ray.ray_env import init_ray

    with no_local_ray(), ray_temp_dir() as temp:
        init_ray(num_cpus=2, temp_dir=temp)
        yield
        ray.shutdown()


def _config(tmp_path: Path, name: str, epochs: int, **run: object) -> Path:
    raw = {
        "name": name,
        "tasks": ["mp-band-gap"],
        "data": {"root": f"s3://{BUCKET}/data", "cutoff": 4.0, "batch_size": 16},
        "model": {"name": "egnn", "params": TINY_EGNN, "head_hidden": 16},
        "optim": {"lr": 3e-3, "epochs": epochs},
        "run": {
            "num_workers": 2,
            "cpus_per_worker": 0.25,
            "storage": f"s3://{BUCKET}/runs",
            "threads_per_worker": 1,
            **run,
        },
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _epochs(prefix: str) -> list[int]:
    """The epochs of ``history.jsonl`` on S3, every line (a repeated epoch shows twice)."""
    from matsci_ray.storage import Uri, read_text

    text = read_text(Uri(f"s3://{BUCKET}/{prefix}/history.jsonl"))
    return [json.loads(line)["epoch"] for line in text.splitlines() if line.strip()]


def _checkpoint(out: str) -> str:
    line = next(line for line in out.splitlines() if line.startswith("checkpoint: "))
    return line.removeprefix("checkpoint: ")


@pytest.mark.slow
def test_ingest_train_evaluate_report_all_on_s3(
    ray_s3: None,
    samples: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)  # nothing may land here: runs/ least of all
    code, err = _ingest_line(f"s3://{BUCKET}/data", samples, capsys)
    assert code == 0, err
    data = _keys("data")
    assert f"{BUCKET}/data/manifest.json" in data
    assert f"{BUCKET}/data/materials-project/manifest.json" in data
    assert any(k.startswith(f"{BUCKET}/data/materials-project/train/part-") for k in data)

    # rank 0 is killed at epoch 2: the run restarts from epoch 1's checkpoint on S3
    config = _config(tmp_path, "killed", 3, fail_at_epoch=2, max_failures=1)
    assert main(["train", str(config)]) == 0
    out = capsys.readouterr().out
    checkpoint = _checkpoint(out)
    assert checkpoint.startswith(f"s3://{BUCKET}/runs/killed/checkpoint_")
    assert _epochs("runs/killed") == [1, 2, 3]
    run = _keys("runs/killed")
    assert any(k.endswith("/checkpoint.pt") for k in run)
    assert any("/tensorboard/events.out.tfevents" in k for k in run)
    assert f"{BUCKET}/runs/killed/.data-order.json" in run

    assert main(["evaluate", checkpoint, "--split", "test", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert "mp-band-gap/mse" in metrics

    report = tmp_path / "report"
    assert main(["report", f"s3://{BUCKET}/runs", "--out", str(report)]) == 0
    assert f"killed,,1,s3://{BUCKET}/runs/killed" in (report / "table3_single_task.csv").read_text()
    html = (report / "report.html").read_text()
    assert "<figcaption>killed (single-task, egnn)</figcaption>" in html  # plots from S3

    # --resume of the finished run, from S3, under a new name with more epochs
    resumed = _config(tmp_path, "resumed", 4)
    assert main(["train", str(resumed), "--resume", checkpoint]) == 0
    capsys.readouterr()
    assert _epochs("runs/resumed") == [1, 2, 3, 4]

    assert not (work / "runs").exists()
    assert os.listdir(work) == []
