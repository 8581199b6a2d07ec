"""MPtrj: streamed in byte-range units, on small files in the release's layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pymatgen.core import Structure

from matsci_ray import keys
from matsci_ray.data.readers import get_reader
from matsci_ray.data.readers.mptrj import material_offsets
from matsci_ray.data.record import Record, Reject, SourceError
from matsci_ray.data.units import KBAR
from tests.format_samples import MP_DOCS, write_mptrj
from tests.samples import ingest_in_process

pytestmark = pytest.mark.skipif(not MP_DOCS.exists(), reason=f"sample data not found at {MP_DOCS}")


@pytest.fixture(scope="module")
def mptrj(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """7 materials of 3 frames each, as MPtrj_2022.9_full.json lays them out."""
    return write_mptrj(tmp_path_factory.mktemp("mptrj") / "MPtrj_2022.9_full.json", 7, 3)


def read(path: Path, chunk_size: int = 2) -> tuple[list[Record], list[Reject]]:
    reader = get_reader("mptrj", chunk_size=chunk_size)
    items = [item for unit in reader.plan(path) for item in reader.read(unit)]
    records = [item for item in items if isinstance(item, Record)]
    return records, [item for item in items if isinstance(item, Reject)]


def test_units_cover_every_material_once(mptrj: Path) -> None:
    units = get_reader("mptrj", chunk_size=2).plan(mptrj)
    assert len(units) == 4  # 7 materials, 2 per unit
    offsets, close = material_offsets(str(mptrj))
    assert len(offsets) == 7 and mptrj.read_bytes()[close : close + 1] == b"}"
    assert [u.start for u in units] == offsets[::2] and units[-1].stop == close


def test_every_frame_matches_json_load(mptrj: Path) -> None:
    records, rejects = read(mptrj)
    assert rejects == []
    document = json.loads(mptrj.read_text())
    frames = [(m, f, frame) for m, fs in document.items() for f, frame in fs.items()]
    assert len(records) == len(frames) == 21
    for record, (material_id, frame_id, frame) in zip(records, frames, strict=True):
        structure = Structure.from_dict(frame["structure"])
        assert (record.sample_id, record.material_id, record.group) == (
            frame_id,
            material_id,
            material_id,
        )
        np.testing.assert_allclose(record.positions, structure.cart_coords, atol=1e-9)
        np.testing.assert_allclose(record.cell, structure.lattice.matrix)
        assert record.targets[keys.ENERGY] == frame["corrected_total_energy"]
        np.testing.assert_array_equal(record.targets[keys.FORCES], frame["force"])
        assert record.targets[keys.FORMATION_ENERGY] == frame["ef_per_atom"]
        assert record.targets[keys.BAND_GAP] == frame["bandgap"]
        if frame["stress"] is None:
            assert keys.STRESS not in record.targets
            continue
        # kbar, positive under compression -> eV/Å³, ASE's sign, Voigt xx yy zz yz xz xy
        s = np.asarray(frame["stress"])
        voigt = [s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]]
        np.testing.assert_allclose(record.targets[keys.STRESS], -KBAR * np.array(voigt))
    unstressed = sum(frame["stress"] is None for _, _, frame in frames)
    assert 0 < unstressed == sum(keys.STRESS not in r.targets for r in records)


def test_pretty_printed_file_reads_the_same(mptrj: Path, tmp_path: Path) -> None:
    pretty = write_mptrj(tmp_path / "pretty.json", 7, 3, indent=2)
    records, _ = read(pretty, chunk_size=3)
    expected, _ = read(mptrj)
    assert [r.sample_id for r in records] == [r.sample_id for r in expected]


def test_inconsistent_frames_are_rejected(tmp_path: Path) -> None:
    path = write_mptrj(tmp_path / "bad.json", 2, 2)
    document = json.loads(path.read_text())
    first, second = document.values()
    frame_a, frame_b = first.values()
    frame_a["energy_per_atom"] += 0.5
    frame_b["force"] = frame_b["force"][:-1]
    next(iter(second.values()))["mp_id"] = "mp-0"
    path.write_text(json.dumps(document))
    _, rejects = read(path)
    reasons = sorted(r.reason for r in rejects)
    assert len(reasons) == 3
    assert "energy_per_atom says" in reasons[0]
    assert "force or stress: shape" in reasons[1]
    assert "frame of 'mp-0' filed under" in reasons[2]


def test_a_truncated_file_is_a_source_error(mptrj: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.json"
    data = mptrj.read_bytes()
    cut.write_bytes(data[: len(data) // 2] + b"}")  # closes, but mid-material
    reader = get_reader("mptrj", chunk_size=2)
    with pytest.raises(SourceError, match="not whole MPtrj materials"):
        for unit in reader.plan(cut):
            list(reader.read(unit))
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(SourceError, match="not the MPtrj layout"):
        reader.plan(tmp_path / "list.json")


def test_ingest_keeps_materials_whole_across_splits(mptrj: Path, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    out = ingest_in_process("mptrj", mptrj, tmp_path)
    table = pq.read_table(sorted((out / "mptrj").glob("*/part-*.parquet")))
    splits_of: dict[str, set[str]] = {}
    for material, split in zip(
        table.column(keys.MATERIAL_ID).to_pylist(),
        table.column(keys.SPLIT).to_pylist(),
        strict=True,
    ):
        splits_of.setdefault(material, set()).add(split)
    assert len(splits_of) == 7 and all(len(s) == 1 for s in splits_of.values())
    assert table.num_rows == 21
