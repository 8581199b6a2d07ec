"""Shard integrity: the manifest's rows, sizes and SHA-256s, `matsci-ray verify`, and the checks
made when a split is opened and read. Every damage here is real bytes on disk: a truncated
shard, a flipped byte inside the positions column, a shard copied over another split's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from matsci_ray import errors
from matsci_ray import keys as K
from matsci_ray.cli.main import main
from matsci_ray.data.dataset import open_dataset, shard_paths
from matsci_ray.data.integrity import sha256_file
from matsci_ray.train.checkpoint import save_checkpoint
from tests.samples import ingest_in_process, tiny_model

MP = "materials-project"


@pytest.fixture(scope="module")
def ingested(samples: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ingested")
    return ingest_in_process(MP, samples / "materials_project" / "summary_docs.jsonl", root)


@pytest.fixture
def root(ingested: Path, tmp_path: Path) -> Path:
    """A private copy of the ingest output, for a test to damage."""
    return Path(shutil.copytree(ingested, tmp_path / "data"))


@pytest.fixture(scope="module")
def checkpoint(ingested: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, config = tiny_model("integrity", ingested, ["mp-formation-energy"])
    directory = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(directory, model, config)
    return directory


def shard(root: Path, split: str) -> Path:
    (path,) = (root / MP / split).glob("part-*.parquet")
    return path


def verify(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str]]:
    code = main(["verify", *argv])
    return code, capsys.readouterr().out.strip().splitlines()


def one_error_line(capsys: pytest.CaptureFixture[str], verb: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"matsci-ray {verb}: error: "), err
    return err[0]


def positions(data: bytes) -> np.ndarray:
    """The positions column as pyarrow reads it by default: no page checksums verified."""
    column = pq.read_table(pa.BufferReader(data), columns=[K.POSITIONS])[K.POSITIONS]
    return column.combine_chunks().flatten().flatten().to_numpy()


def flip_a_position(path: Path) -> float:
    """Flip one bit inside the positions column's pages so that an unchecked read still
    decodes and returns a different coordinate; returns how far that coordinate moved (Å)."""
    data = path.read_bytes()
    before = positions(data)
    chunk = (
        pq.ParquetFile(path)
        .metadata.row_group(0)
        .column(pq.ParquetFile(path).schema_arrow.get_field_index(K.POSITIONS))
    )
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    for offset in range(start + 64, start + chunk.total_compressed_size):
        damaged = bytearray(data)
        damaged[offset] ^= 0x10
        try:
            after = positions(bytes(damaged))
        except (OSError, pa.ArrowException):
            continue  # this byte breaks decoding outright: not the silent case
        if after.shape == before.shape and not np.array_equal(after, before):
            path.write_bytes(bytes(damaged))
            return float(np.abs(after - before).max())
    raise AssertionError(f"{path}: no bit flip in the positions pages changes a value silently")


def test_manifest_records_rows_bytes_and_sha256_and_verify_passes(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = json.loads((root / MP / "manifest.json").read_text())
    assert {s["split"] for s in manifest["shards"]} == set(K.SPLITS)
    for entry in manifest["shards"]:
        path = root / MP / entry["path"]
        assert entry["bytes"] == path.stat().st_size
        assert entry["sha256"] == sha256_file(path)
        assert entry["rows"] == pq.read_metadata(path).num_rows
    for target in (root, root / MP):  # the ingest output, or one data set's directory
        code, out = verify(capsys, str(target))
        assert code == 0, out
        assert out == ["ok: 3 shards in 1 data set match their manifests (sizes, rows and SHA-256)"]


def test_truncated_shard_is_named_by_verify_open_and_evaluate(
    ray_local: None, root: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    test = shard(root, "test")
    test.write_bytes(test.read_bytes()[: test.stat().st_size // 2])
    code, out = verify(capsys, str(root))
    assert code == 1
    (line, summary) = out
    assert line.startswith(f"{test}: size ") and "unreadable" in line, line
    assert summary.startswith("bad: 1 of 3 shards") and MP in summary
    with pytest.raises(errors.ShardError, match=r"size \d+ bytes, the manifest says") as info:
        open_dataset(root, MP, "test")
    assert errors.one_line(info.value).startswith(f"{test}: ")
    assert main(["evaluate", str(checkpoint), "--data-root", str(root)]) == 2
    line = one_error_line(capsys, "evaluate")
    assert line.startswith(f"matsci-ray evaluate: error: {test}: size "), line
    open_dataset(root, MP, "train")  # the other splits still open


def test_flipped_byte_in_positions_is_named_by_verify_and_by_every_read(
    ray_local: None, root: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    test = shard(root, "test")
    moved = flip_a_position(test)
    assert moved > 0  # what a reader without page checksums returns, silently
    code, out = verify(capsys, str(root / MP))
    assert code == 1
    assert out[0] == (
        f"{test}: sha256 differs from the manifest's; unreadable (could not verify page "
        "integrity, CRC checksum verification failed for page_ordinal 0)"
    ), out
    shard_paths(root, MP, "test")  # same size and rows: only the pages can tell
    with pytest.raises(errors.ShardError) as info:
        open_dataset(root, MP, "test", columns=[K.SAMPLE_ID, K.POSITIONS]).take_all()
    found = errors.user_facing(info.value)
    assert isinstance(found, errors.ShardError)
    assert errors.one_line(found).startswith(f"{test}: unreadable shard (could not verify page")
    assert main(["evaluate", str(checkpoint), "--split", "test", "--data-root", str(root)]) == 2
    line = one_error_line(capsys, "evaluate")
    assert line.startswith(f"matsci-ray evaluate: error: {test}: unreadable shard"), line


def test_shard_copied_over_another_split_is_named_by_verify_and_open(
    ray_local: None, root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    test, val = shard(root, "test"), shard(root, "val")
    shutil.copyfile(val, test)
    code, out = verify(capsys, str(root))
    assert code == 1
    assert out[0].startswith(f"{test}: size ") and out[0].endswith("holds rows of split 'val'")
    with pytest.raises(errors.ShardError, match="the manifest says") as info:
        open_dataset(root, MP, "test")
    assert str(info.value).startswith(f"{test}: ")
    open_dataset(root, MP, "val")  # the source of the copy is intact


def test_shard_replaced_after_the_split_was_opened_fails_the_read(
    ray_local: None, root: Path
) -> None:
    """A re-ingest during a run must not mix two ingests: the read re-checks size and rows."""
    train = shard(root, "train")
    ds = open_dataset(root, MP, "train", columns=[K.SAMPLE_ID])
    shutil.copyfile(shard(root, "val"), train)
    with pytest.raises(errors.ShardError) as info:
        ds.take_all()
    message = errors.one_line(errors.user_facing(info.value))
    assert message.startswith(f"{train}: size ") and "since the split was opened" in message


def test_verify_exit_codes(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    val = shard(root, "val")
    val.unlink()
    for argv in ([str(root)], ["--quick", str(root)]):
        code, out = verify(capsys, *argv)
        assert code == 1 and out[0] == f"{val}: missing", out
    manifest = root / MP / "manifest.json"
    stale = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**stale, "schema_version": 1}))
    code, out = verify(capsys, str(root))
    assert code == 1 and out[0].startswith(f"{manifest}: schema version 1 != "), out
    assert main(["verify", str(tmp_path / "nowhere")]) == 2
    assert "no manifest.json" in one_error_line(capsys, "verify")
