"""The CDVAE generative benchmark's CSVs (carbon-24, perov-5, mp-20): a CIF string per row plus
property columns.

Splits are the files' own: ``train.csv``, ``val.csv`` and ``test.csv`` fill the split of their
name (a file named otherwise is refused), so results compare with the published benchmark.

Targets: ``--target NAME=COLUMN`` (``NAME`` a canonical target), else the data set's defaults.
The energy columns whose basis the data sets document are converted by the cell's atom count:
carbon-24's ``energy_per_atom`` is eV per atom, perov-5's ``heat_ref``/``heat_all`` are eV per
5-atom cell (the heat of formation Matbench calls ``e_form``), mp-20's
``formation_energy_per_atom`` is eV per atom. Any other column is taken as it is: the user
vouches for its unit, as with the ``generic`` source.

Each CIF must parse to one ordered structure whose composition is the CIF's own
``_chemical_formula_sum`` and whose volume is its ``_cell_volume``: a site merged or dropped
by the parser, or a cell read wrongly, is a reject naming the row.
"""

from __future__ import annotations

import csv
import math
import sys
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from matsci_ray import keys
from matsci_ray.data.readers.base import SourceReader
from matsci_ray.data.readers.generic import convert_target
from matsci_ray.data.readers.lmdb_source import RecordRejected
from matsci_ray.data.record import Record, Reject, SourceError, WorkUnit
from matsci_ray.errors import ConfigError

DEFAULT_CHUNK_SIZE = 500  # rows per work unit: a CIF parse costs milliseconds
CIF_COLUMN = "cif"
ID_COLUMN = "material_id"

Basis = Literal["atom", "cell"]
# Energy columns whose basis the benchmark's data sets document (module docstring).
ENERGY_COLUMNS: dict[str, Basis] = {
    "energy_per_atom": "atom",
    "formation_energy_per_atom": "atom",
    "heat_ref": "cell",
    "heat_all": "cell",
}
_VOLUME_TOLERANCE = 1e-3  # relative: the CIF's _cell_volume is printed to 8 digits

# A CIF is one field of one row; the csv module's default limit (128 kB) is below a large cell's.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


def target_basis(name: str) -> Basis | None:
    """Whether canonical target ``name`` is an energy per cell, per atom, or no energy."""
    spec = keys.TARGETS[name]
    if spec.extensive:
        return "cell"
    return "atom" if spec.per_atom_energy else None


def energy_factor(column: str, target: str) -> Literal["times_n", "over_n", "as_is"]:
    """How a ``column`` value becomes ``target``'s; ``ConfigError`` for an energy that cannot."""
    source, wanted = ENERGY_COLUMNS.get(column), target_basis(target)
    if source is None or source == wanted:
        return "as_is"
    if wanted is None:
        raise ConfigError(
            f"--target {target}={column}: {column} is an energy per {source}, {target} is not an "
            "energy"
        )
    return "times_n" if source == "atom" else "over_n"


def split_of(file: str | Path) -> str:
    """The split a CDVAE file defines by its name: ``val.csv`` -> ``"val"``."""
    stem = Path(file).name.removesuffix(".csv")
    if stem not in keys.SPLITS:
        raise SourceError(
            str(file),
            f"a CDVAE CSV is named by its split ({', '.join(s + '.csv' for s in keys.SPLITS)})",
        )
    return stem


def _rows(file: str, start: int, stop: int | None) -> Iterator[tuple[int, dict[str, str]]]:
    """``(row index, row)`` for data rows ``[start, stop)``; the header row is not counted."""
    try:
        with open(file, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None or CIF_COLUMN not in reader.fieldnames:
                raise SourceError(file, f"no {CIF_COLUMN!r} column in the header")
            for index, row in enumerate(reader):
                if stop is not None and index >= stop:
                    return
                if index >= start:
                    yield index, row
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise SourceError(file, f"unreadable CSV ({type(exc).__name__}: {exc})") from None


def header(file: str) -> list[str]:
    try:
        with open(file, newline="", encoding="utf-8") as fh:
            return next(csv.reader(fh), [])
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise SourceError(file, f"unreadable CSV ({type(exc).__name__}: {exc})") from None


def parse_cif(text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Atomic numbers, Cartesian positions and cell rows (Å) of a one-structure CIF string.

    ``RecordRejected`` says why a CIF does not give one ordered structure matching its own
    formula and volume.
    """
    from pymatgen.core import Composition
    from pymatgen.io.cif import CifParser

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pymatgen warns per rounded coordinate
            parser = CifParser.from_str(text)
            structures = parser.parse_structures(primitive=False, on_error="raise")
    except Exception as exc:  # pymatgen raises anything from ValueError to KeyError
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise RecordRejected(f"unparsable CIF ({type(exc).__name__}: {first})") from None
    if len(structures) != 1:
        raise RecordRejected(f"CIF holds {len(structures)} structures, expected one")
    structure = structures[0]
    if not structure.is_ordered:
        raise RecordRejected("partial occupancy: a disordered site")
    block = next(iter(parser.as_dict().values()))
    formula = block.get("_chemical_formula_sum")
    if formula is not None and not Composition(formula).almost_equals(structure.composition):
        raise RecordRejected(
            f"CIF formula {formula} but {structure.composition.formula} parsed "
            "(sites merged or dropped)"
        )
    volume = block.get("_cell_volume")
    if volume is not None:
        error = abs(structure.volume / float(volume) - 1)
        if error > _VOLUME_TOLERANCE:
            raise RecordRejected(f"cell volume {structure.volume:.4g} Å³, CIF says {volume}")
    numbers = np.array([site.specie.Z for site in structure], dtype=np.int64)
    cell = np.array(structure.lattice.matrix, dtype=np.float64)
    return numbers, np.array(structure.cart_coords, dtype=np.float64), cell


class CDVAECSVReader(SourceReader):
    """One CDVAE data set's CSVs; subclasses name the data set and its default targets."""

    suffixes: ClassVar[tuple[str, ...]] = (".csv",)
    default_targets: ClassVar[Mapping[str, str]]  # canonical target -> column
    target_option: ClassVar[bool] = True  # the ingest command's --target applies

    def __init__(
        self, targets: Mapping[str, str] | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE
    ) -> None:
        chosen = dict(targets) if targets else dict(self.default_targets)
        unknown = [name for name in chosen if name not in keys.TARGETS]
        if unknown:
            raise ConfigError(
                f"unknown target(s) {', '.join(unknown)}; allowed: {', '.join(keys.TARGETS)}"
            )
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.columns = chosen
        self.factors = {name: energy_factor(column, name) for name, column in chosen.items()}
        self.targets = tuple(chosen)  # type: ignore[misc]
        self.chunk_size = chunk_size

    def plan(self, file: Path) -> list[WorkUnit]:
        path = str(file)
        split_of(path)
        missing = [c for c in (ID_COLUMN, *self.columns.values()) if c not in header(path)]
        if missing:
            raise SourceError(
                path, f"no column(s) {', '.join(missing)}; choose --target NAME=COLUMN"
            )
        count = sum(1 for _ in _rows(path, 0, None))
        return [
            WorkUnit(self.name, path, start, min(start + self.chunk_size, count))
            for start in range(0, count, self.chunk_size)
        ]

    def read(self, unit: WorkUnit) -> Iterator[Record | Reject]:
        split = split_of(unit.file)
        for index, row in _rows(unit.file, unit.start, unit.stop):
            key = f"row {index}"
            try:
                yield self._record(row, split, unit.file, key)
            except RecordRejected as exc:
                yield Reject(unit.file, key, str(exc))

    def _record(self, row: dict[str, str], split: str, file: str, key: str) -> Record:
        material_id = (row.get(ID_COLUMN) or "").strip()
        if not material_id:
            raise RecordRejected(f"no {ID_COLUMN}")
        numbers, positions, cell = parse_cif(row.get(CIF_COLUMN) or "")
        targets = {
            name: self._target(name, row.get(column), len(numbers))
            for name, column in self.columns.items()
        }
        return Record(
            dataset=self.dataset,
            sample_id=material_id,
            atomic_numbers=numbers,
            positions=positions,
            cell=cell,
            pbc=np.ones(3, dtype=bool),
            targets=targets,
            group=material_id,
            material_id=material_id if material_id.startswith(("mp-", "mvc-")) else None,
            split=split,
            source_file=file,
            source_key=key,
        )

    def _target(self, name: str, text: str | None, natoms: int) -> Any:
        column = self.columns[name]
        try:
            value = convert_target(keys.TARGETS[name], float(text or "nan"), natoms)
        except ValueError as exc:
            raise RecordRejected(f"{name} (from {column}): {exc}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise RecordRejected(f"{name}: no value in column {column}")
        factor = self.factors[name]
        if factor == "times_n":
            return value * natoms
        return value / natoms if factor == "over_n" else value


class Carbon24Reader(CDVAECSVReader):
    """Carbon-24: carbon polymorphs from random structure search at 10 GPa, 6-24 atoms."""

    name: ClassVar[str] = "carbon-24"
    dataset: ClassVar[str] = "carbon-24"
    # energy_per_atom (eV/atom) times the atom count: the cell's total DFT energy.
    default_targets: ClassVar[Mapping[str, str]] = {keys.ENERGY: "energy_per_atom"}


class Perov5Reader(CDVAECSVReader):
    """Perov-5: 5-atom ABX3 perovskites of 56 elements."""

    name: ClassVar[str] = "perov-5"
    dataset: ClassVar[str] = "perov-5"
    # heat_ref is eV per 5-atom cell; divided by the atom count: eV/atom.
    default_targets: ClassVar[Mapping[str, str]] = {keys.FORMATION_ENERGY: "heat_ref"}


class MP20Reader(CDVAECSVReader):
    """MP-20: Materials Project structures of at most 20 atoms."""

    name: ClassVar[str] = "mp-20"
    dataset: ClassVar[str] = "mp-20"
    default_targets: ClassVar[Mapping[str, str]] = {
        keys.FORMATION_ENERGY: "formation_energy_per_atom",
        keys.BAND_GAP: "band_gap",
    }
