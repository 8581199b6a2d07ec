"""Downloader, extraction, MP API paging and the ``download`` CLI against a local HTTP server.

Nothing here touches the internet: a threaded ``http.server`` on 127.0.0.1 serves archives built
in tmp_path from the shared OC20 samples and fakes the MP ``/materials/summary/`` endpoint.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from matsci_ray.cli.download import register
from matsci_ray.data.download import (
    CATALOGUE,
    Checksum,
    DownloadError,
    download_file,
    extract_archive,
)
from matsci_ray.data.mp_api import MPAPIError, download_summary, iter_summary_docs, resolve_api_key

SAMPLES = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
TRAJS = [SAMPLES / "oc20" / "trajectories" / f"random{i}.traj" for i in (1000100, 1000120)]
MP_DOCS = SAMPLES / "materials_project" / "summary_docs.jsonl"
pytestmark = pytest.mark.skipif(not MP_DOCS.exists(), reason="shared sample data sets missing")
API_KEY = "test-key"


@dataclass
class Fake:
    """What the server serves and how it misbehaves; ``log`` records every request."""

    files: dict[str, bytes] = field(default_factory=dict)
    honor_range: bool = True
    cut_after: int | None = None  # close the connection after N body bytes, once
    fail_next: int = 0  # answer 503 to this many requests
    mp_docs: list[dict[str, Any]] = field(default_factory=list)
    mp_fail_skip: int | None = None  # answer 500 to the page at this _skip
    log: list[dict[str, Any]] = field(default_factory=list)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, *args: object) -> None:  # keep pytest output quiet
        pass

    def _send(self, status: int, body: bytes, **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        fake, url = self.server.fake, urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        fake.log.append({"path": url.path, "range": self.headers.get("Range"), **query})
        if fake.fail_next:
            fake.fail_next -= 1
            return self._send(503, b"busy")
        if url.path == "/materials/summary/":
            return self._summary(fake, query)
        data = fake.files.get(url.path)
        if data is None:
            return self._send(404, b"not found")
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        start = int(match[1]) if match and fake.honor_range else 0
        if start >= len(data) > 0 and match:
            return self._send(416, b"", Content_Range=f"bytes */{len(data)}")
        body = data[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body)))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if fake.cut_after is not None:  # HTTP/1.0: returning closes the socket mid-body
            self.wfile.write(body[: fake.cut_after])
            fake.cut_after = None
            return
        self.wfile.write(body)

    def _summary(self, fake: Fake, query: dict[str, str]) -> None:
        if self.headers.get("X-API-KEY") != API_KEY:
            return self._send(401, b'{"detail": "invalid api key"}')
        skip, limit = int(query["_skip"]), int(query["_limit"])
        if skip == fake.mp_fail_skip:
            return self._send(500, b"internal error")
        page = {"data": fake.mp_docs[skip : skip + limit], "meta": {"total_doc": len(fake.mp_docs)}}
        self._send(200, json.dumps(page).encode(), Content_Type="application/json")


class _Server(ThreadingHTTPServer):
    fake: Fake


@pytest.fixture
def server() -> Iterator[tuple[str, Fake]]:
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.fake = Fake()
    thread = threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", httpd.fake
    finally:
        httpd.shutdown()
        httpd.server_close()


def _tar(mode: str = "w:gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for path in TRAJS:
            tf.add(path, arcname=f"s2ef_sample/{path.name}")
    return buf.getvalue()


def _sha256(data: bytes) -> Checksum:
    return Checksum("sha256", hashlib.sha256(data).hexdigest())


def test_full_download_verifies_extracts_and_skips_when_present(server, tmp_path) -> None:
    base, fake = server
    data = fake.files["/oc20.tar.gz"] = _tar()
    dest = download_file(f"{base}/oc20.tar.gz", tmp_path / "oc20.tar.gz", _sha256(data))
    assert dest.read_bytes() == data and not (tmp_path / "oc20.tar.gz.part").exists()
    extract_archive(dest, tmp_path / "x")
    for path in TRAJS:
        assert (tmp_path / "x" / "s2ef_sample" / path.name).read_bytes() == path.read_bytes()
    download_file(f"{base}/oc20.tar.gz", dest, _sha256(data))
    assert len(fake.log) == 1  # present with a matching checksum: no second request


def test_interrupted_download_resumes_with_range(server, tmp_path) -> None:
    base, fake = server
    data = fake.files["/oc20.tar.gz"] = _tar()
    cut = len(data) // 3
    fake.cut_after = cut
    dest, url = tmp_path / "oc20.tar.gz", f"{base}/oc20.tar.gz"
    with pytest.raises(DownloadError, match=re.escape(url)):
        download_file(url, dest, _sha256(data), retries=0)
    kept = (tmp_path / "oc20.tar.gz.part").stat().st_size
    assert 0 < kept <= cut and not dest.exists()  # the in-flight chunk may be lost, no more
    download_file(url, dest, _sha256(data), retries=0)
    assert dest.read_bytes() == data
    assert [r["range"] for r in fake.log] == [None, f"bytes={kept}-"]


def test_retry_within_one_call_resumes_and_survives_503(server, tmp_path) -> None:
    base, fake = server
    data = fake.files["/f.bin"] = bytes(range(256)) * 4000
    fake.cut_after = 300_000
    download_file(f"{base}/f.bin", tmp_path / "f.bin", _sha256(data), retries=2, backoff=0)
    assert (tmp_path / "f.bin").read_bytes() == data
    assert fake.log[0]["range"] is None
    resumed_at = re.fullmatch(r"bytes=(\d+)-", fake.log[1]["range"])
    assert resumed_at and 0 < int(resumed_at[1]) <= 300_000
    fake.fail_next = 2  # two 503s, then the file
    download_file(f"{base}/f.bin", tmp_path / "g.bin", _sha256(data), retries=2, backoff=0)
    assert (tmp_path / "g.bin").read_bytes() == data and len(fake.log) == 5


def test_server_ignoring_range_restarts_cleanly(server, tmp_path) -> None:
    base, fake = server
    data = fake.files["/oc20.tar.gz"] = _tar()
    fake.honor_range = False
    dest = tmp_path / "oc20.tar.gz"
    (tmp_path / "oc20.tar.gz.part").write_bytes(b"garbage that is not the file's prefix")
    download_file(f"{base}/oc20.tar.gz", dest, _sha256(data))
    assert dest.read_bytes() == data
    assert fake.log[0]["range"] is not None  # we asked for a range; the 200 overwrote the part


def test_complete_part_answered_416_is_verified_and_renamed(server, tmp_path) -> None:
    base, fake = server
    data = fake.files["/a.bin"] = b"abc" * 1000
    (tmp_path / "a.bin.part").write_bytes(data)  # killed after the last byte, before the rename
    download_file(f"{base}/a.bin", tmp_path / "a.bin", _sha256(data))
    assert (tmp_path / "a.bin").read_bytes() == data and fake.log[0]["range"] == "bytes=3000-"


def test_checksum_mismatch_removes_part(server, tmp_path) -> None:
    base, fake = server
    fake.files["/oc20.tar.gz"] = _tar()
    dest = tmp_path / "oc20.tar.gz"
    with pytest.raises(DownloadError, match=r"checksum mismatch for oc20\.tar\.gz from http"):
        download_file(f"{base}/oc20.tar.gz", dest, Checksum("sha256", "0" * 64))
    assert not dest.exists() and not (tmp_path / "oc20.tar.gz.part").exists()


def test_md5_alternatives_and_http_error(server, tmp_path) -> None:
    base, fake = server
    data = fake.files["/a.bin"] = b"x" * 5000
    md5 = hashlib.md5(data).hexdigest()
    download_file(f"{base}/a.bin", tmp_path / "a.bin", Checksum("md5", "f" * 32, (md5,)))
    with pytest.raises(DownloadError, match=r"HTTP 404 .* for http://127\.0\.0\.1:\d+/missing"):
        download_file(f"{base}/missing", tmp_path / "missing", retries=3, backoff=0)
    assert len(fake.log) == 2  # a 404 is not retried


def _evil_tar(path: Path, kind: str) -> None:
    with tarfile.open(path, "w") as tf:
        info = tarfile.TarInfo("../evil.txt" if kind == "dotdot" else "/tmp/evil.txt")
        if kind == "symlink":
            info = tarfile.TarInfo("inner/link")
            info.type, info.linkname = tarfile.SYMTYPE, "../../evil.txt"
        payload = b"pwned"
        info.size = 0 if kind == "symlink" else len(payload)
        tf.addfile(info, io.BytesIO(payload))


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "zip"])
def test_extraction_refuses_path_traversal(tmp_path, kind: str) -> None:
    archive = tmp_path / ("evil.zip" if kind == "zip" else "evil.tar")
    if kind == "zip":
        with zipfile.ZipFile(archive, "w") as zf:
            zf.writestr("../evil.txt", "pwned")
    else:
        _evil_tar(archive, kind)
    with pytest.raises(DownloadError, match=r"refusing to extract evil\.(tar|zip): member"):
        extract_archive(archive, tmp_path / "out" / "deep")
    assert not (tmp_path / "out" / "evil.txt").exists()
    assert not list((tmp_path / "out").rglob("*evil*"))


@pytest.mark.parametrize("suffix", ["tar.xz", "zip"])
def test_extraction_formats(tmp_path, suffix: str) -> None:
    archive = tmp_path / f"a.{suffix}"
    if suffix == "zip":
        with zipfile.ZipFile(archive, "w") as zf:
            zf.writestr("d/one.txt", "1")
    else:
        archive.write_bytes(b"")
        with tarfile.open(archive, "w:xz") as tf:
            info = tarfile.TarInfo("d/one.txt")
            info.size = 1
            tf.addfile(info, io.BytesIO(b"1"))
    assert (extract_archive(archive, tmp_path / "o") / "d" / "one.txt").read_text() == "1"


def test_catalogue_is_well_formed() -> None:
    for dataset, splits in CATALOGUE.items():
        for split, archive in splits.items():
            assert archive.url.startswith("https://")
            # figshare serves a file by its number; the name is the catalogue's
            assert archive.url.endswith(archive.filename) or "/ndownloader/files/" in archive.url
            assert (dataset, split) == (archive.dataset, archive.split)
            if dataset.startswith("oc20"):
                assert archive.checksum and re.fullmatch("[0-9a-f]{32}", archive.checksum.hexdigest)


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="matsci-ray")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_cli_catalogue_download_with_base_url(server, tmp_path, capsys) -> None:
    base, fake = server
    data = fake.files["/s2ef_train_200K.tar"] = _tar("w")
    out = tmp_path / "oc20"
    argv = ["download", "oc20-s2ef", "--split", "200k", "--base-url", base, "--out", str(out)]
    assert _cli(argv) == 1  # our sample tar does not match the published MD5
    assert "checksum mismatch for s2ef_train_200K.tar" in capsys.readouterr().err
    assert not (out / "s2ef_train_200K.tar").exists()
    assert _cli([*argv, "--sha256", hashlib.sha256(data).hexdigest()]) == 0
    assert (out / "s2ef_sample" / TRAJS[0].name).read_bytes() == TRAJS[0].read_bytes()


def test_cli_url_help_and_usage_errors(server, tmp_path, capsys) -> None:
    base, fake = server
    fake.files["/m/lips.xyz"] = b"2\n\nLi 0 0 0\nS 1 1 1\n"
    assert _cli(["download", "url", "--url", f"{base}/m/lips.xyz", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "lips.xyz").read_bytes() == fake.files["/m/lips.xyz"]
    assert _cli(["download", "url", "--out", str(tmp_path)]) == 2
    assert _cli(["download", "oc20-s2ef", "--split", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown split 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        _cli(["download", "--help"])
    assert exc.value.code == 0 and "materials-project" in capsys.readouterr().out


def _mp_docs(n: int = 30) -> list[dict[str, Any]]:
    with MP_DOCS.open() as fh:
        return [json.loads(next(fh)) for _ in range(n)]


def test_mp_download_resumes_after_failed_page(server, tmp_path) -> None:
    base, fake = server
    fake.mp_docs, fake.mp_fail_skip = _mp_docs(), 20
    out = tmp_path / "mp"
    kwargs: dict[str, Any] = {"api_key": API_KEY, "endpoint": base, "page_size": 10}
    with pytest.raises(MPAPIError, match="skip 20"):
        download_summary(out, retries=0, **kwargs)
    assert json.loads((out / "state.json").read_text())["next_skip"] == 20
    first_run = len(fake.log)
    fake.mp_fail_skip = None
    assert download_summary(out, retries=0, **kwargs) == 30
    assert list(iter_summary_docs(out)) == fake.mp_docs
    assert [int(r["_skip"]) for r in fake.log[first_run:]] == [20]  # complete via total_doc
    assert all(r["_limit"] == "10" and "structure" in r["_fields"] for r in fake.log)
    assert download_summary(out, retries=0, **kwargs) == 30 and len(fake.log) == first_run + 1
    with pytest.raises(MPAPIError, match="different page_size"):
        download_summary(out, api_key=API_KEY, endpoint=base, page_size=7)


def test_mp_auth_errors(server, tmp_path, monkeypatch, capsys) -> None:
    base, fake = server
    fake.mp_docs = _mp_docs(5)
    with pytest.raises(MPAPIError, match=r"refused the key \(HTTP 401\)"):
        download_summary(tmp_path, api_key="wrong", endpoint=base, retries=3, backoff=0)
    monkeypatch.delenv("MP_API_KEY", raising=False)
    with pytest.raises(MPAPIError, match="MP_API_KEY"):
        resolve_api_key(None)
    out = str(tmp_path / "mp")
    assert _cli(["download", "materials-project", "--base-url", base, "--out", out]) == 2
    assert "no Materials Project API key" in capsys.readouterr().err
    monkeypatch.setenv("MP_API_KEY", API_KEY)
    assert _cli(["download", "materials-project", "--base-url", base, "--out", out]) == 0
    assert len(list(iter_summary_docs(Path(out)))) == 5
