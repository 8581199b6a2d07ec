"""Errors a user can fix cross Ray intact and reach the console as one line, exit 2."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import lmdb
import pytest
import torch

from matsci_ray import errors
from matsci_ray.cli.main import main


def _all_error_types() -> list[type[errors.MatSciError]]:
    found, stack = [], [errors.MatSciError]
    while stack:
        cls = stack.pop()
        found.append(cls)
        stack.extend(cls.__subclasses__())
    return found


def _example(cls: type[errors.MatSciError]) -> errors.MatSciError:
    if issubclass(cls, errors.SourceError):
        return cls("data/x.extxyz", "truncated", "7")
    return cls("data/x: something is wrong")


@pytest.mark.parametrize("cls", _all_error_types(), ids=lambda c: c.__name__)
def test_every_error_type_pickles_back_equal(cls: type[errors.MatSciError]) -> None:
    error = _example(cls)
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is cls
    assert str(back) == str(error)
    assert vars(back) == vars(error)


def test_source_error_keeps_file_and_record() -> None:
    back = pickle.loads(pickle.dumps(errors.SourceError("f.lmdb", "refused", "3")))
    assert (back.file, back.key, back.reason) == ("f.lmdb", "3", "refused")
    assert str(back) == "f.lmdb [record 3]: refused"


def _raise_source_error() -> None:
    raise errors.SourceError("in/a.extxyz", "truncated frame", "12")


def test_error_raised_in_a_ray_task_reaches_the_driver_as_itself(ray_local: None) -> None:
    import ray

    task = ray.remote(num_cpus=0.1, max_retries=0)(_raise_source_error)
    with pytest.raises(errors.SourceError) as info:
        ray.get(task.remote())
    found = errors.user_facing(info.value)
    assert isinstance(found, errors.SourceError)
    assert errors.one_line(found) == "in/a.extxyz [record 12]: truncated frame"


def _ingest_error(capsys: pytest.CaptureFixture[str], *argv: str) -> list[str]:
    code = main(["ingest", *argv, "--no-progress"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2, lines
    assert len(lines) == 1, lines
    return lines


class _Shell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_refused_pickle_is_one_line_naming_file_and_record(
    ray_local: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "pwned"
    file = tmp_path / "evil.lmdb"
    env = lmdb.open(str(file), subdir=False, map_size=1 << 22)
    with env.begin(write=True) as txn:
        txn.put(b"0", pickle.dumps({"x": _Shell(marker)}))
    env.close()
    (line,) = _ingest_error(capsys, "oqmd", str(file), "--out", str(tmp_path / "out"))
    assert line.startswith("matsci-ray ingest: error: ")
    assert str(file) in line and "[record 0]" in line and "posix.system" in line
    assert not marker.exists()


def test_truncated_and_binary_extxyz_are_one_line(
    ray_local: None, samples: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = (samples / "lips" / "lips_devset.extxyz").read_text()
    truncated = tmp_path / "cut.extxyz"
    truncated.write_text(text[: len(text) // 3])
    binary = tmp_path / "noise.extxyz"
    binary.write_bytes(bytes(range(256)) * 64)
    for file in (truncated, binary):
        (line,) = _ingest_error(capsys, "lips", str(file), "--out", str(tmp_path / "out"))
        assert str(file) in line, line


def test_truncated_lmdb_is_one_line(
    ray_local: None, samples: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = samples / "matsciml-devsets" / "oqmd" / "data.lmdb"
    cut = tmp_path / "cut.lmdb"
    cut.write_bytes(source.read_bytes()[: os.path.getsize(source) // 2])
    (line,) = _ingest_error(capsys, "oqmd", str(cut), "--out", str(tmp_path / "out"))
    assert str(cut) in line


def test_refused_checkpoint_is_one_line_without_torch_advice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "checkpoint.pt"
    torch.save({"format_version": 2, "model": _Shell(marker)}, evil)
    assert main(["evaluate", str(evil)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert str(evil) in line and "refused" in line and "posix.system" in line
    assert "weights_only" not in line
    assert not marker.exists()
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x80\x02not a checkpoint" * 10)
    assert main(["evaluate", str(garbage)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert str(garbage) in line and "corrupt or truncated" in line


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"junk")
    with pytest.raises(errors.CheckpointError):
        main(["--debug", "evaluate", str(garbage)])


def test_a_missing_checkpoint_is_a_user_error_not_retried(tmp_path: Path) -> None:
    from matsci_ray.train.checkpoint import load_model

    # a MatSciError: a worker that meets it ends the run instead of retrying (train.preflight)
    with pytest.raises(errors.CheckpointError, match="no checkpoint here"):
        load_model(tmp_path / "nowhere")


def test_an_address_where_nothing_listens_is_one_line_at_once(
    samples: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--address`` of a port with no Ray head: exit 2 with one line naming the address,
    within seconds (Ray's own join retries a silent address for many minutes)."""
    import time

    from matsci_ray.ray_env import free_port

    address = f"127.0.0.1:{free_port(0)}"  # free a moment ago: nothing listens there
    from tests.conftest import no_local_ray

    docs = samples / "materials_project" / "summary_docs.jsonl"
    argv = ["ingest", "materials-project", str(docs), "--out", str(tmp_path), "--address", address]
    with no_local_ray():  # a connected process would not join anything
        start = time.monotonic()
        assert main(argv) == 2
        assert time.monotonic() - start < 30
    [line] = capsys.readouterr().err.strip().splitlines()
    assert address in line and "nothing answers" in line


def test_weights_of_another_model_version_are_one_line(tmp_path: Path) -> None:
    """A checkpoint whose weights no longer fit the model its config builds (a release that
    changed an architecture): one line naming the checkpoint and a mismatched key, not
    torch's list of every key (a CheckpointError: exit 2 at the console)."""
    from matsci_ray.config import ExperimentConfig
    from matsci_ray.potential import MatSciModel
    from matsci_ray.train.checkpoint import FILENAME, load_model, save_checkpoint
    from tests.samples import TINY_EGNN

    config = ExperimentConfig.model_validate(
        {
            "name": "old",
            "tasks": ["mp-band-gap"],
            "data": {"root": str(tmp_path / "data")},
            "model": {"name": "egnn", "params": TINY_EGNN, "head_hidden": 16},
        }
    )
    (tmp_path / "ckpt").mkdir()
    path = save_checkpoint(tmp_path / "ckpt", MatSciModel.from_config(config), config, epoch=1)
    file = path / FILENAME if path.is_dir() else path
    state = torch.load(file, weights_only=True)
    state["model"] = {f"old_{k}" if "embedding" in k else k: v for k, v in state["model"].items()}
    torch.save(state, file)
    with pytest.raises(errors.CheckpointError) as raised:
        load_model(path)
    (line,) = str(raised.value).splitlines()
    assert str(path) in line and "do not fit this model" in line and "encoder.embedding" in line
