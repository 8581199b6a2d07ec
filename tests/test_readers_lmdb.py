"""Readers for the MatSciML LMDB devsets and MP JSON lines, on the shared sample data."""

from __future__ import annotations

import gzip
import itertools
import json
import os
import pickle
import shutil
from pathlib import Path

import lmdb
import numpy as np
import pytest

from matsci_ray.data.readers import get_reader
from matsci_ray.data.readers.lips_lmdb import read_lips_lmdb
from matsci_ray.data.readers.lmdb_source import RecordRejected, iter_lmdb, plan_lmdb
from matsci_ray.data.record import Record, Reject, SourceError, WorkUnit

DEVSETS = {  # reader name -> (devset directory, records)
    "materials-project": ("materials_project", 200),
    "oqmd": ("oqmd", 200),
    "nomad": ("nomad", 200),
    "carolina-db": ("carolina_db", 100),
}


def _read_all(name: str, file: Path, **options: int) -> list[Record | Reject]:
    reader = get_reader(name, **options)
    return [item for unit in reader.plan(file) for item in reader.read(unit)]


def _by_key(items: list[Record | Reject]) -> dict[str, Record]:
    return {r.source_key: r for r in items if isinstance(r, Record)}


def _write_lmdb(path: Path, values: dict[bytes, bytes]) -> None:
    env = lmdb.open(str(path), subdir=False, map_size=1 << 24)
    with env.begin(write=True) as txn:
        for key, value in values.items():
            txn.put(key, value)
    env.close()


@pytest.mark.parametrize("name", sorted(DEVSETS))
def test_every_devset_record_is_read(samples: Path, name: str) -> None:
    directory, expected = DEVSETS[name]
    file = samples / "matsciml-devsets" / directory / "data.lmdb"
    items = _read_all(name, file, chunk_size=64)  # several units per file
    rejects = [r for r in items if isinstance(r, Reject)]
    assert rejects == []
    records = [r for r in items if isinstance(r, Record)]
    assert len(records) == expected
    assert len({r.sample_id for r in records}) == expected
    assert sorted(int(r.source_key) for r in records) == list(range(expected))
    for r in records:
        n = len(r.atomic_numbers)
        assert r.positions.shape == (n, 3) and r.positions.dtype == np.float64
        assert r.cell.shape == (3, 3) and r.pbc.shape == (3,) and r.pbc.dtype == bool
        assert r.dataset == get_reader(name).dataset and r.targets


def test_lips_lmdb_matches_extxyz(samples: Path) -> None:
    ase_io = pytest.importorskip("ase.io")
    file = samples / "matsciml-devsets" / "lips" / "data.lmdb"
    items = [x for unit in plan_lmdb("lips", file, 64) for x in read_lips_lmdb(unit)]
    assert len(items) == 200 and all(isinstance(x, Record) for x in items)
    frames = ase_io.read(samples / "lips" / "lips_devset.extxyz", ":")
    for record in items[::37]:
        assert isinstance(record, Record)
        frame = frames[int(record.source_key)]
        np.testing.assert_allclose(record.positions, frame.positions, atol=1e-5)
        np.testing.assert_allclose(record.cell, frame.cell.array, atol=1e-5)
        np.testing.assert_allclose(record.targets["forces"], frame.get_forces(), atol=1e-5)
        assert record.targets["energy"] == pytest.approx(frame.get_potential_energy())
        assert record.dataset == "lips" and record.pbc.all()


def test_nomad_converts_si_units(samples: Path) -> None:
    records = _by_key(_read_all("nomad", samples / "matsciml-devsets/nomad/data.lmdb"))
    first = records["0"]
    assert np.linalg.norm(first.cell[0]) == pytest.approx(4.3416691700000006, rel=1e-12)
    assert first.positions[0] == pytest.approx([4.3410330714481, 0.0, 0.6260145883476])
    assert first.targets["energy"] == pytest.approx(-20.83926785, rel=1e-9)  # VASP, eV
    assert first.targets["efermi"] == pytest.approx(-3.02130902, rel=1e-9)
    assert first.targets["space_group"] == 12
    assert "formation_energy_per_atom" not in first.targets
    # FHI-aims reports a gap of -0.016 eV (bands cross): a metal, stored as 0.
    assert records["21"].targets["band_gap"] == 0.0
    assert records["40"].targets["band_gap"] == pytest.approx(11.6781)  # Ne, VASP
    # Same NOMAD material, different calculations: one split group.
    assert records["21"].group == records["46"].group is not None


def test_oqmd_fractional_cart_coords_are_converted(samples: Path) -> None:
    records = _by_key(_read_all("oqmd", samples / "matsciml-devsets/oqmd/data.lmdb"))
    first = records["0"]  # YbMnNO; sites[0] = "Mn @ 0.75 0.25 0.5", cart_coords the same
    assert first.positions[0] == pytest.approx([0.75 * 4.059705, 0.25 * 4.059705, 0.5 * 7.195297])
    assert first.atomic_numbers[0] == 25
    assert first.targets["formation_energy_per_atom"] == pytest.approx(-1.59414634085853)
    assert first.targets["space_group"] == 129  # P4/nmm
    assert records["31"].targets["space_group"] == 14  # "P21/c", written without "_"


def test_carolina_fractional_coords_and_cif_fields(samples: Path) -> None:
    records = _by_key(_read_all("carolina-db", samples / "matsciml-devsets/carolina_db/data.lmdb"))
    first = records["0"]  # Tc(Ir4S3)2, Pm-3m, a = 6.48742247 Å, cart_coords fractional
    assert abs(np.linalg.det(first.cell)) == pytest.approx(273.03388087, rel=1e-6)
    assert first.positions[1] == pytest.approx([0.30783943 * 6.48742247] * 3, abs=1e-6)
    assert first.targets == {"formation_energy_per_atom": 1.026, "space_group": 221}


def test_mp_jsonl_hand_checked(samples: Path) -> None:
    records = _read_all("materials-project", samples / "materials_project/summary_docs.jsonl")
    assert len(records) == 200 and all(isinstance(r, Record) for r in records)
    first = records[0]  # line 1: Ac, symmetry.symbol "P3_121" -> 152
    assert isinstance(first, Record)
    assert first.sample_id.endswith("summary_docs:1") and first.source_key == "line 1"
    assert first.targets["space_group"] == 152
    assert first.targets["formation_energy_per_atom"] == pytest.approx(0.0155857975)
    assert first.targets["is_stable"] is False and first.material_id is None
    assert first.positions[0] == pytest.approx([2.621923802176, 0.0, 0.0])


def test_mp_jsonl_and_lmdb_agree(samples: Path) -> None:
    jsonl = _read_all("materials-project", samples / "materials_project/summary_docs.jsonl")
    devset = _read_all(
        "materials-project", samples / "matsciml-devsets/materials_project/data.lmdb"
    )

    def identity(r: Record | Reject) -> tuple:
        assert isinstance(r, Record)
        return (tuple(r.atomic_numbers), round(r.targets["formation_energy_per_atom"], 9))

    by_identity = {identity(r): r for r in jsonl}
    matched = 0
    for record in devset:
        other = by_identity.get(identity(record))
        if other is None:
            continue
        matched += 1
        assert isinstance(record, Record)
        np.testing.assert_allclose(record.cell, other.cell, atol=1e-9)
        np.testing.assert_allclose(record.positions, other.positions, atol=1e-9)
        assert record.targets == other.targets
        # one material read from either file is one split group: it cannot straddle splits
        assert record.group == other.group
    assert matched >= 190
    assert len({r.group for r in jsonl}) >= 190  # ...while distinct materials stay distinct


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 5000])
def test_jsonl_units_cover_every_line_once(samples: Path, chunk_size: int) -> None:
    file = samples / "materials_project/summary_docs.jsonl"
    reader = get_reader("materials-project", chunk_size=chunk_size)
    units = reader.plan(file)
    assert len(units) == -(-200 // chunk_size)
    keys = [r.source_key for u in units for r in reader.read(u)]
    assert keys == [f"line {i}" for i in range(1, 201)]


def test_jsonl_arbitrary_byte_ranges_are_exact(samples: Path) -> None:
    # Cuts that fall mid-line: each line belongs to the unit in which it starts.
    file = str(samples / "materials_project/summary_docs.jsonl")
    size = os.path.getsize(file)
    cuts = sorted({0, 1, 1000, 1001, 5003, 77777, size - 1, size})
    reader = get_reader("materials-project")
    units = [WorkUnit("materials-project", file, a, b) for a, b in itertools.pairwise(cuts)]
    ids = [r.sample_id for u in units for r in reader.read(u)]
    assert ids == [f"summary_docs:{i}" for i in range(1, 201)]


def test_jsonl_gzip_matches_plain(samples: Path, tmp_path: Path) -> None:
    plain = samples / "materials_project/summary_docs.jsonl"
    packed = tmp_path / "summary_docs.jsonl.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    a = _read_all("materials-project", plain)
    b = _read_all("materials-project", packed)
    assert [r.source_key for r in a] == [r.source_key for r in b]
    truncated = tmp_path / "cut.jsonl.gz"
    truncated.write_bytes(packed.read_bytes()[:20000])
    with pytest.raises(SourceError, match=r"cut\.jsonl\.gz"):
        _read_all("materials-project", truncated)


def test_corrupt_and_truncated_json_lines(samples: Path, tmp_path: Path) -> None:
    lines = (samples / "materials_project/summary_docs.jsonl").read_text().splitlines()[:3]
    broken = tmp_path / "broken.jsonl"
    broken.write_text("\n".join([lines[0], lines[1][:-40] + "}", lines[2]]) + "\n")
    items = _read_all("materials-project", broken)
    assert [type(x).__name__ for x in items] == ["Record", "Reject", "Record"]
    assert items[1] == Reject(str(broken), "line 2", items[1].reason)
    assert "invalid JSON" in items[1].reason
    cut = tmp_path / "cut.jsonl"
    cut.write_text(lines[0] + "\n" + lines[1][:500])
    with pytest.raises(SourceError, match=r"cut.jsonl \[record line 2\].*truncated"):
        _read_all("materials-project", cut)


def test_mp_partial_occupancy_rejected(samples: Path, tmp_path: Path) -> None:
    doc = json.loads((samples / "materials_project/summary_docs.jsonl").open().readline())
    doc["structure"]["sites"][0]["species"] = [
        {"element": "Ac", "occu": 0.5},
        {"element": "La", "occu": 0.5},
    ]
    file = tmp_path / "disordered.jsonl"
    file.write_text(json.dumps(doc) + "\n")
    (reject,) = _read_all("materials-project", file)
    assert isinstance(reject, Reject) and "partial occupancy" in reject.reason


def test_malicious_pickle_in_lmdb_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Shell:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, (f"touch {marker}",))

    file = tmp_path / "evil.lmdb"
    good = pickle.dumps({"cell": [[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]})
    _write_lmdb(file, {b"0": good, b"1": pickle.dumps({"x": Shell()})})
    with pytest.raises(SourceError) as info:
        _read_all("oqmd", file)
    assert str(file) in str(info.value) and info.value.key == "1"
    assert "refused global posix.system" in str(info.value)
    assert not marker.exists()


def test_truncated_and_foreign_lmdb_files(samples: Path, tmp_path: Path) -> None:
    source = samples / "matsciml-devsets/oqmd/data.lmdb"
    for size in (100, 8192, os.path.getsize(source) // 2, os.path.getsize(source) - 4096):
        cut = tmp_path / f"cut{size}.lmdb"
        cut.write_bytes(source.read_bytes()[:size])
        with pytest.raises(SourceError, match=rf"cut{size}.lmdb.*(truncated|not a readable)"):
            get_reader("oqmd").plan(cut)
        with pytest.raises(SourceError, match=f"cut{size}.lmdb"):
            list(iter_lmdb(WorkUnit("oqmd", str(cut), 0, 10)))
    text = tmp_path / "text.lmdb"
    text.write_text("not an lmdb\n" * 2000)
    with pytest.raises(SourceError, match="not a readable LMDB"):
        get_reader("nomad").plan(text)


def test_numeric_key_order_and_metadata_keys(tmp_path: Path) -> None:
    file = tmp_path / "keys.lmdb"
    values = {str(i).encode(): pickle.dumps({"i": i}) for i in range(12)}
    values[b"metadata"] = pickle.dumps({"note": "not a record"})
    values[b"!first"] = pickle.dumps({"note": "sorts before digits"})
    _write_lmdb(file, values)
    units = plan_lmdb("oqmd", file, chunk_size=5)
    assert [(u.start, u.stop) for u in units] == [(0, 5), (5, 10), (10, 12)]
    got = [rec["i"] for u in units for _, rec in iter_lmdb(u)]
    assert got == list(range(12))
    sparse = tmp_path / "sparse.lmdb"  # gaps and leading zeros: the keys are listed instead
    _write_lmdb(sparse, {b"3": pickle.dumps({"i": 3}), b"010": pickle.dumps({"i": 10})})
    units = plan_lmdb("oqmd", sparse, chunk_size=1)
    assert [[k for k, _ in iter_lmdb(u)] for u in units] == [["3"], ["010"]]


def test_corrupt_record_value_names_key(samples: Path, tmp_path: Path) -> None:
    file = tmp_path / "garbage.lmdb"
    _write_lmdb(file, {b"0": b"\x80\x05not a pickle", b"1": pickle.dumps([1, 2])})
    with pytest.raises(SourceError, match=r"garbage.lmdb \[record 0\]: corrupt pickle"):
        list(iter_lmdb(WorkUnit("oqmd", str(file), 0, 1)))
    with pytest.raises(SourceError, match=r"\[record 1\]: record is a list"):
        list(iter_lmdb(WorkUnit("oqmd", str(file), 1, 2)))
    copy = tmp_path / "copy" / "data.lmdb"
    copy.parent.mkdir()
    shutil.copy(samples / "matsciml-devsets/carolina_db/data.lmdb", copy)
    assert len(_read_all("carolina-db", copy)) == 100


def test_coordinate_convention_is_decided_per_record(samples: Path) -> None:
    from matsci_ray.data.readers.carolina import convert_carolina
    from matsci_ray.data.readers.oqmd import convert_oqmd

    devsets = samples / "matsciml-devsets"
    for convert, file in ((convert_oqmd, "oqmd"), (convert_carolina, "carolina_db")):
        ((_, rec),) = iter_lmdb(WorkUnit("x", str(devsets / file / "data.lmdb"), 0, 1))
        expected = convert(rec)
        cartesian = dict(rec, cart_coords=np.asarray(rec["cart_coords"]) @ expected["cell"])
        np.testing.assert_allclose(convert(cartesian)["positions"], expected["positions"])
        squashed = dict(rec, cart_coords=np.asarray(rec["cart_coords"]) * 0.01)
        with pytest.raises(RecordRejected, match="cannot tell"):
            convert(squashed)
