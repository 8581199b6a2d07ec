"""The CDVAE CSV readers (carbon-24, perov-5, mp-20) on the shared sample CSVs."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import pytest
from pymatgen.core import Structure

from matsci_ray import keys
from matsci_ray.cli.ingest import reader_options
from matsci_ray.data.readers import get_reader
from matsci_ray.data.readers.cdvae_csv import CDVAECSVReader
from matsci_ray.data.record import Record, Reject, SourceError
from matsci_ray.errors import ConfigError, UserError
from tests.samples import SAMPLES, ingest_in_process

CDVAE = SAMPLES / "cdvae"
pytestmark = pytest.mark.skipif(not CDVAE.is_dir(), reason=f"sample data not found at {CDVAE}")


def read_rows(reader: CDVAECSVReader, file: Path, rows: int) -> list[Record | Reject]:
    """The first ``rows`` rows of ``file``, through the reader's own plan."""
    unit = reader.plan(file)[0]
    assert unit.stop is not None and unit.stop >= rows
    return list(reader.read(unit))[:rows]


def csv_rows(file: Path, rows: int) -> list[dict[str, str]]:
    with file.open(newline="") as fh:
        return [row for _, row in zip(range(rows), csv.DictReader(fh), strict=False)]


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_carbon24_matches_pymatgen_and_totals_the_energy() -> None:
    file = CDVAE / "carbon_24" / "val.csv"
    records = read_rows(get_reader("carbon-24"), file, 20)
    for record, row in zip(records, csv_rows(file, 20), strict=True):
        assert isinstance(record, Record)
        structure = Structure.from_str(row["cif"], fmt="cif")
        n = len(structure)
        assert record.sample_id == row["material_id"] and record.split == "val"
        assert record.dataset == "carbon-24" and set(record.atomic_numbers) == {6}
        np.testing.assert_allclose(record.cell, structure.lattice.matrix)
        np.testing.assert_allclose(record.positions, structure.cart_coords)
        # eV/atom in the file; the canonical energy is the cell's total
        assert record.targets == {keys.ENERGY: pytest.approx(float(row["energy_per_atom"]) * n)}


def test_perov5_heat_of_formation_per_cell_becomes_per_atom() -> None:
    file = CDVAE / "perov_5" / "test.csv"
    records = read_rows(get_reader("perov-5"), file, 20)
    for record, row in zip(records, csv_rows(file, 20), strict=True):
        assert isinstance(record, Record) and len(record.atomic_numbers) == 5
        assert record.split == "test" and record.material_id is None
        expected = float(row["heat_ref"]) / 5
        assert record.targets == {keys.FORMATION_ENERGY: pytest.approx(expected)}


def test_target_option_replaces_the_defaults_and_refuses_energy_into_a_gap() -> None:
    file = CDVAE / "perov_5" / "val.csv"
    reader = get_reader("perov-5", targets={keys.BAND_GAP: "ind_gap"})
    records = read_rows(reader, file, 5)
    for record, row in zip(records, csv_rows(file, 5), strict=True):
        assert isinstance(record, Record)
        assert record.targets == {keys.BAND_GAP: float(row["ind_gap"])}
    with pytest.raises(ConfigError, match="heat_ref is an energy per cell"):
        get_reader("perov-5", targets={keys.BAND_GAP: "heat_ref"})
    with pytest.raises(SourceError, match="no column"):
        get_reader("perov-5", targets={keys.BAND_GAP: "gap"}).plan(file)


def test_cli_passes_target_to_cdvae_sources_only() -> None:
    def options(source: str, *targets: str) -> dict:
        args = argparse.Namespace(
            source=source, target=list(targets), dataset=None, chunk_size=None
        )
        return reader_options(args)

    assert options("perov-5", "band_gap=dir_gap") == {"targets": {"band_gap": "dir_gap"}}
    assert options("carbon-24") == {}
    with pytest.raises(UserError, match="does not apply"):
        options("oqmd", "band_gap=x")


def test_bad_rows_are_rejected_with_reasons(tmp_path: Path) -> None:
    rows = csv_rows(CDVAE / "carbon_24" / "test.csv", 4)
    # a CIF with its last atom line gone no longer matches its own formula
    lines = rows[0]["cif"].rstrip("\n").split("\n")
    rows[0]["cif"] = "\n".join(lines[:-1]) + "\n"
    rows[1]["energy_per_atom"] = ""
    rows[2]["cif"] = "not a cif"
    items = list(
        get_reader("carbon-24").read(
            get_reader("carbon-24").plan(write_csv(tmp_path / "test.csv", rows))[0]
        )
    )
    reasons = [item.reason for item in items if isinstance(item, Reject)]
    assert len(reasons) == 3 and isinstance(items[3], Record)
    assert "sites merged or dropped" in reasons[0]
    assert "no value in column energy_per_atom" in reasons[1]
    assert "unparsable CIF" in reasons[2] or "structures" in reasons[2]


def test_a_file_not_named_by_its_split_is_refused(tmp_path: Path) -> None:
    file = write_csv(tmp_path / "carbon.csv", csv_rows(CDVAE / "carbon_24" / "val.csv", 2))
    with pytest.raises(SourceError, match="named by its split"):
        get_reader("carbon-24").plan(file)


def test_ingest_keeps_the_files_splits(tmp_path: Path) -> None:
    """Every row lands in the split its file names, never a hashed one."""
    data = tmp_path / "perov"
    for split in ("val", "test"):
        write_csv(data / f"{split}.csv", csv_rows(CDVAE / "perov_5" / f"{split}.csv", 30))
    out = tmp_path / "out"
    for file in sorted(data.iterdir()):
        ingest_in_process("perov-5", file, out)
        manifest = json.loads((out / "perov-5" / "manifest.json").read_text())
        assert manifest["split_assignment"] == {"source": 30}
        counts = {split: manifest["counts"][split] for split in keys.SPLITS}
        assert counts == {split: 30 if split == file.stem else 0 for split in keys.SPLITS}
