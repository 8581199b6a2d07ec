"""Carolina Materials Database entries (CIF fields) from the MatSciML LMDB devset.

Targets: ``energy`` is the formation energy in eV/atom -> ``formation_energy_per_atom``;
``_symmetry_Int_Tables_number`` -> space group number. CIF values are strings; the formula
fields carry literal quotes (``"'Tc1 Ir8 S6'"``).

The cell is built from ``_cell_length_*``/``_cell_angle_*`` in pymatgen's orientation (as
pymatgen's CIF parser builds it; c along z) and checked against ``_cell_volume``. Quirk: like OQMD,
``cart_coords`` holds *fractional* coordinates in every devset record; the convention is
decided per record by which reading gives plausible interatomic distances
(``resolve_coordinates``), and ``atomic_numbers`` is checked against ``_chemical_formula_sum``.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, ClassVar

import numpy as np

from matsci_ray import keys
from matsci_ray.data.readers.lmdb_dict import LMDBDictReader
from matsci_ray.data.readers.lmdb_source import (
    RecordRejected,
    optional_float,
    resolve_coordinates,
)

_CELL_FIELDS = tuple(f"_cell_length_{x}" for x in "abc") + tuple(
    f"_cell_angle_{x}" for x in ("alpha", "beta", "gamma")
)
_VOLUME_RTOL = 1e-4  # CIF values carry 8 decimals


def _cif_number(record: dict[str, Any], name: str) -> float | None:
    """A CIF numeric string such as ``"6.48742247"`` or ``"1.234(5)"`` (s.u. dropped)."""
    value = record.get(name)
    if value is None or (isinstance(value, str) and value.strip() in ("", "?", ".")):
        return None
    if isinstance(value, str):
        text = re.sub(r"\(\d+\)$", "", value.strip().strip("'\""))
        try:
            return float(text)
        except ValueError:
            raise RecordRejected(f"unparsable {name}: {value!r:.40}") from None
    return optional_float(value, name)


def _formula_counts(formula: Any) -> Counter[int] | None:
    """Atom counts of ``"'Tc1 Ir8 S6'"``; ``None`` if absent or not in that simple form."""
    from ase.data import atomic_numbers as symbol_to_z

    if not isinstance(formula, str):
        return None
    counts: Counter[int] = Counter()
    for token in formula.strip().strip("'\"").split():
        match = re.fullmatch(r"([A-Z][a-z]?)(\d*\.?\d*)", token)
        if match is None or match.group(1) not in symbol_to_z:
            return None
        amount = float(match.group(2) or 1)
        if amount != int(amount):
            return None  # fractional amounts: partial occupancy, checked elsewhere
        counts[symbol_to_z[match.group(1)]] += int(amount)
    return counts or None


def _cell(record: dict[str, Any]) -> np.ndarray:
    from pymatgen.core import Lattice

    params = [_cif_number(record, name) for name in _CELL_FIELDS]
    if any(p is None for p in params):
        missing = [n for n, p in zip(_CELL_FIELDS, params, strict=True) if p is None]
        raise RecordRejected(f"missing cell parameters {missing}")
    a, b, c, alpha, beta, gamma = (float(p) for p in params if p is not None)
    cell = np.array(Lattice.from_parameters(a, b, c, alpha, beta, gamma).matrix, dtype=float)
    volume = _cif_number(record, "_cell_volume")
    det = abs(float(np.linalg.det(cell)))
    if not np.isfinite(det) or det <= 0:
        raise RecordRejected(f"cell parameters give no volume: {params}")
    if volume is not None and abs(det - volume) > _VOLUME_RTOL * volume:
        raise RecordRejected(f"cell parameters give {det:.6g} Å³ but _cell_volume={volume:.6g}")
    return cell


def convert_carolina(record: dict[str, Any]) -> dict[str, Any]:
    """Canonical structure and targets of one Carolina record (keyword arguments for ``Record``)."""
    targets: dict[str, Any] = {}
    energy = optional_float(record.get("energy"), "energy")
    if energy is not None:
        targets[keys.FORMATION_ENERGY] = energy
    number = _cif_number(record, "_symmetry_Int_Tables_number")
    if number is not None:
        if number != int(number):
            raise RecordRejected(f"non-integer _symmetry_Int_Tables_number {number}")
        targets[keys.SPACE_GROUP] = int(number)
    if not targets:
        raise RecordRejected("no target present")

    try:
        numbers = np.asarray(record["atomic_numbers"], dtype=np.int64)
        coords = np.asarray(record["cart_coords"], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as exc:
        raise RecordRejected(f"missing or unparsable atoms: {exc}") from None
    if numbers.ndim != 1 or coords.shape != (len(numbers), 3) or len(numbers) == 0:
        raise RecordRejected(f"cart_coords {coords.shape} do not fit {numbers.shape} numbers")
    expected = _formula_counts(record.get("_chemical_formula_sum"))
    if expected is not None and Counter(numbers.tolist()) != expected:
        raise RecordRejected("atomic_numbers disagree with _chemical_formula_sum")
    cell = _cell(record)
    positions, how = resolve_coordinates(coords, cell)
    if positions is None:
        raise RecordRejected(f"cannot tell whether cart_coords are fractional: {how}")
    return {
        "atomic_numbers": numbers,
        "positions": positions,
        "cell": cell,
        "pbc": np.ones(3, dtype=bool),
        "targets": targets,
    }


class CarolinaReader(LMDBDictReader):
    name: ClassVar[str] = "carolina-db"
    dataset: ClassVar[str] = "carolina-db"
    targets: ClassVar[tuple[str, ...]] = (keys.FORMATION_ENERGY, keys.SPACE_GROUP)

    convert = staticmethod(convert_carolina)
