"""fairchem's ASE-LMDB (``.aselmdb``), on files written by ASE's database API with the
``aselmdb`` backend (``ase-db-backends``, the writer fairchem uses) from the sample structures."""

from __future__ import annotations

import json
from pathlib import Path

import ase.db
import ase.io
import numpy as np
import pyarrow.parquet as pq
import pytest
from ase import Atoms

from matsci_ray import keys
from matsci_ray.data.readers import get_reader
from matsci_ray.data.record import Record, Reject, SourceError
from tests.format_samples import MP_DOCS, labelled, mp_atoms
from tests.samples import SAMPLES, ingest_in_process

pytest.importorskip("ase_db_backends", reason="the aselmdb extra is not installed")
OC20_FRAME = SAMPLES / "oc20" / "trajectories" / "random1000100.traj"
pytestmark = pytest.mark.skipif(not MP_DOCS.exists(), reason=f"sample data not found at {SAMPLES}")


@pytest.fixture(scope="module")
def aselmdb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 MP structures (two systems' ``sid``, a ``data`` band gap) and one OC20 slab frame
    with its FixAtoms constraint and tags."""
    path = tmp_path_factory.mktemp("aselmdb") / "omat.aselmdb"
    db = ase.db.connect(path, type="aselmdb")
    for index, atoms in enumerate(mp_atoms(12)):
        db.write(labelled(atoms, index), sid=f"system-{index % 2}", data={"gap": 0.1 * index})
    slab = ase.io.read(OC20_FRAME, 0)
    assert isinstance(slab, Atoms)
    slab.set_tags(np.arange(len(slab)) % 3)
    db.write(labelled(slab, 99))
    db.close()
    return path


def read(path: Path, **options: object) -> tuple[list[Record], list[Reject]]:
    reader = get_reader("omat24", **options)
    items = [item for unit in reader.plan(path) for item in reader.read(unit)]
    records = [item for item in items if isinstance(item, Record)]
    return records, [item for item in items if isinstance(item, Reject)]


def test_every_field_matches_ase_db(aselmdb: Path) -> None:
    records, rejects = read(aselmdb, chunk_size=5)
    assert rejects == [] and len(records) == 13
    db = ase.db.connect(aselmdb, type="aselmdb", readonly=True)
    for record, row in zip(records, db.select(), strict=True):
        atoms = row.toatoms()
        assert record.sample_id == f"omat:{row.id}" and record.dataset == "omat24"
        np.testing.assert_array_equal(record.atomic_numbers, atoms.numbers)
        np.testing.assert_allclose(record.positions, atoms.positions)
        np.testing.assert_allclose(record.cell, atoms.cell.array)
        assert record.targets[keys.ENERGY] == pytest.approx(row.energy)
        np.testing.assert_allclose(record.targets[keys.FORCES], row.forces)
        # ASE's stress is already the canonical eV/Å³, ASE sign, Voigt order
        np.testing.assert_allclose(record.targets[keys.STRESS], row.stress)
    slab = records[-1]
    np.testing.assert_array_equal(slab.targets[keys.TAGS], np.arange(len(slab.positions)) % 3)
    assert slab.targets[keys.FIXED].any() and not slab.targets[keys.FIXED].all()


def test_frames_of_one_system_share_a_group(aselmdb: Path) -> None:
    records, _ = read(aselmdb)
    assert {r.group for r in records[:12]} == {"sid=system-0", "sid=system-1"}
    assert records[12].group is None  # no sid: the sample id is the split unit


def test_user_targets_come_from_the_row_data(aselmdb: Path) -> None:
    records, rejects = read(aselmdb, targets={keys.BAND_GAP: "gap", keys.ENERGY: "energy"})
    assert [r.targets[keys.BAND_GAP] for r in records] == pytest.approx(
        [0.1 * i for i in range(12)]
    )
    assert set(records[0].targets) == {keys.BAND_GAP, keys.ENERGY}
    assert [r.reason for r in rejects] == ["band_gap: no 'gap' in the row"]


def test_deleted_rows_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "deleted.aselmdb"
    db = ase.db.connect(path, type="aselmdb")
    for index, atoms in enumerate(mp_atoms(4)):
        db.write(labelled(atoms, index))
    db.delete([2])
    db.close()
    records, _ = read(path, chunk_size=2)
    assert [r.sample_id for r in records] == ["deleted:1", "deleted:3", "deleted:4"]


def test_a_damaged_file_is_a_source_error(tmp_path: Path) -> None:
    path = tmp_path / "junk.aselmdb"
    path.write_bytes(b"not an lmdb" * 100)
    with pytest.raises(SourceError, match=r"junk\.aselmdb: not a readable LMDB"):
        get_reader("omat24").plan(path)


def test_ingest_writes_stress_to_the_shards(aselmdb: Path, tmp_path: Path) -> None:
    out = ingest_in_process("omat24", aselmdb, tmp_path)
    manifest = json.loads((out / "omat24" / "manifest.json").read_text())
    assert manifest["counts"]["total"] == 13 and manifest["counts"]["rejected"] == 0
    table = pq.read_table(sorted((out / "omat24").glob("*/part-*.parquet")))
    stresses = [s for s in table.column(keys.STRESS).to_pylist() if s is not None]
    assert len(stresses) == 13 and all(len(s) == 6 for s in stresses)
