"""Ingest inputs: empty files are errors, and sample ids are unique across every input.

Through the real CLI entry point (in-process, on the session's local Ray), on small files
written here: an error must be one line naming the file, exit code 2, also when it is raised
inside a Ray task.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import ase.io
import numpy as np
import pyarrow.parquet as pq
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import Trajectory

from matsci_ray import keys as K
from matsci_ray.cli.main import main
from matsci_ray.data.dataset import shard_paths
from matsci_ray.data.readers import get_reader
from tests.samples import SAMPLES

pytestmark = pytest.mark.usefixtures("ray_local")


def frames(count: int, seed: int = 0) -> list[Atoms]:
    """``count`` labelled 4-atom Li cells (5 Å cube) that pass validation."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        grid = np.array([[0, 0, 0], [2.5, 0, 0], [0, 2.5, 0], [0, 0, 2.5]], dtype=float)
        atoms = Atoms("Li4", positions=grid + rng.uniform(-0.1, 0.1, (4, 3)), cell=[5, 5, 5])
        atoms.pbc = True
        forces = rng.normal(0, 0.1, (4, 3))
        atoms.calc = SinglePointCalculator(atoms, energy=-7.5 + rng.normal(), forces=forces)
        out.append(atoms)
    return out


def write_xyz(path: Path, count: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ase.io.write(path, frames(count, seed), format="extxyz")
    return path


def ingest(source: str, *paths: Path, out: Path, extra: tuple[str, ...] = ()) -> int:
    args = ["ingest", source, *map(str, paths), "--out", str(out), "--no-progress", *extra]
    return main(args)


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("matsci-ray ingest: error: "), err
    return err[0]


def ids_and_groups(out: Path, dataset: str) -> list[tuple[str, str]]:
    paths = [p for split in K.SPLITS for p in shard_paths(out, dataset, split)]
    table = pq.read_table(paths, columns=[K.SAMPLE_ID, K.GROUP])
    return sorted(zip(*table.to_pydict().values(), strict=True))


# --- empty inputs ------------------------------------------------------------------------


def test_empty_file_given_directly_or_in_a_directory_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = write_xyz(tmp_path / "d" / "good.extxyz", 2)
    empty = tmp_path / "d" / "empty.extxyz"
    empty.touch()
    blank = tmp_path / "blank" / "blank.extxyz"  # bytes, but not one frame in it
    blank.parent.mkdir()
    blank.write_text("\n\n")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.txt").write_text("not a frame file")  # already an error
    cases = {
        "direct": ([empty], empty, "empty file (0 bytes)"),
        "in a directory": ([good.parent], empty, "empty file (0 bytes)"),
        "no records": ([good, blank], blank, "empty: no records in it"),
        "no frame file": ([blank.parent, tmp_path / "notes"], tmp_path / "notes", "no "),
    }
    for name, (paths, culprit, message) in cases.items():
        assert ingest("lips", *paths, out=tmp_path / "out") == 2, name
        assert f": error: {culprit}: {message}" in one_error_line(capsys), name


def test_empty_inputs_found_only_by_reading_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A gzipped JSON lines file of blank lines and a trajectory without frames plan as one
    unit each; the unit task (IS2RE) or the driver (MP) finds them empty."""
    docs = tmp_path / "mp" / "docs.jsonl.gz"
    docs.parent.mkdir()
    with gzip.open(docs, "wt") as fh:
        fh.write("\n\n")
    assert ingest("materials-project", docs, out=tmp_path / "out") == 2
    assert one_error_line(capsys).endswith(f"{docs}: empty: no records in it")

    traj = tmp_path / "oc20" / "random1.traj"
    traj.parent.mkdir()
    Trajectory(str(traj), "w").close()
    assert traj.stat().st_size > 0
    assert ingest("oc20-is2re", traj, out=tmp_path / "out") == 2
    assert one_error_line(capsys).endswith(f"{traj}: empty: the trajectory has no frames")


# --- sample ids ----------------------------------------------------------------------------


def test_input_ids_are_paths_under_the_root_given(tmp_path: Path) -> None:
    a = write_xyz(tmp_path / "a" / "sub" / "x.extxyz", 1)
    b = write_xyz(tmp_path / "b" / "sub" / "x.extxyz.gz", 1)
    reader = get_reader("lips")
    assert [name for _, name in reader.inputs([tmp_path])] == ["a/sub/x", "b/sub/x"]
    assert [name for _, name in reader.inputs([tmp_path / "a", tmp_path / "b"])] == [
        "a/sub/x",
        "b/sub/x",
    ]
    assert reader.inputs([a]) == [(a, "sub/x")]  # a file alone keeps its directory's name
    assert reader.inputs([a, b]) == [(a, "a/sub/x"), (b, "b/sub/x")]  # files: their root
    assert reader.inputs([tmp_path / "b" / "sub"]) == [(b, "x")]  # suffixes dropped


def test_same_file_name_in_two_folders_keeps_every_record(tmp_path: Path) -> None:
    # Both files are `sub/x`: the old "<parent dir>/<stem>" ids were equal across the units.
    write_xyz(tmp_path / "in" / "a" / "sub" / "x.extxyz", 3, seed=1)
    write_xyz(tmp_path / "in" / "b" / "sub" / "x.extxyz", 3, seed=2)
    assert ingest("lips", tmp_path / "in", out=tmp_path / "out") == 0
    manifest = json.loads((tmp_path / "out" / "lips" / "manifest.json").read_text())
    assert manifest["counts"]["total"] == 6 and manifest["counts"]["rejected"] == 0
    ids = [sample_id for sample_id, _ in ids_and_groups(tmp_path / "out", "lips")]
    assert ids == [f"{d}/sub/x:{i}" for d in "ab" for i in range(3)]


def test_a_resumed_ingest_with_other_input_ids_redoes_the_units(tmp_path: Path) -> None:
    write_xyz(tmp_path / "in" / "a" / "x.extxyz", 2)
    assert ingest("lips", tmp_path / "in" / "a", out=tmp_path / "out") == 0
    assert [i for i, _ in ids_and_groups(tmp_path / "out", "lips")] == ["x:0", "x:1"]
    write_xyz(tmp_path / "in" / "b" / "x.extxyz", 2)
    assert ingest("lips", tmp_path / "in", out=tmp_path / "out") == 0
    ids = [i for i, _ in ids_and_groups(tmp_path / "out", "lips")]
    assert ids == ["a/x:0", "a/x:1", "b/x:0", "b/x:1"]


@pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"sample data not found at {SAMPLES}")
def test_oc20_trajectories_of_one_name_in_two_folders(tmp_path: Path) -> None:
    """Two copies of a system: distinct ids, and the system stays the split group."""
    source = SAMPLES / "oc20" / "trajectories" / "random1000100.traj"
    first = ase.io.read(source, ":3")
    for folder in ("a", "b"):
        (tmp_path / "in" / folder).mkdir(parents=True)
        ase.io.write(tmp_path / "in" / folder / "random1000100.traj", first)
    assert ingest("oc20-s2ef", tmp_path / "in", out=tmp_path / "out") == 0
    rows = ids_and_groups(tmp_path / "out", "oc20-s2ef")
    expected = [(f"{d}/random1000100:{i}", "random1000100") for d in "ab" for i in range(3)]
    assert rows == expected


def test_a_file_and_its_gz_twin_are_refused_naming_both(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plain = write_xyz(tmp_path / "d" / "x.extxyz", 2)
    twin = plain.with_name("x.extxyz.gz")
    with open(plain, "rb") as src, gzip.open(twin, "wb") as dst:
        shutil.copyfileobj(src, dst)
    assert ingest("lips", tmp_path / "d", out=tmp_path / "out") == 2
    line = one_error_line(capsys)
    assert f"error: {twin}: same input id 'x' as {plain}" in line
    assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"sample data not found at {SAMPLES}")
def test_one_material_in_two_inputs_or_two_units_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Materials Project ids come from the documents, not the file names: the driver compares
    the units' ids (a unit already refuses a repeat within itself)."""
    docs = (SAMPLES / "materials_project" / "summary_docs.jsonl").read_text().splitlines()[:3]
    # the sample documents carry no material_id: give each one, as the MP API does
    lines = [
        json.dumps({**json.loads(doc), "material_id": f"mp-{i}"}) for i, doc in enumerate(docs)
    ]
    material = "mp-0"
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("\n".join(lines[:2]) + "\n")
    b.write_text("\n".join([lines[2], lines[0]]) + "\n")
    assert ingest("materials-project", a, b, out=tmp_path / "out") == 2
    line = one_error_line(capsys)
    assert line.endswith(f"{b}: sample_id {material!r} is also in {a}: " + _UNIQUE)

    both = tmp_path / "both.jsonl"
    both.write_text("\n".join([lines[0], lines[1], lines[0]]) + "\n")
    extra = ("--chunk-size", "2")  # the repeat lands in the second unit
    assert ingest("materials-project", both, out=tmp_path / "out2", extra=extra) == 2
    line = one_error_line(capsys)
    assert line.endswith(f"{both}: sample_id {material!r} is twice in it: " + _UNIQUE)


_UNIQUE = "sample ids must be unique within a data set (the same record read twice?)"
