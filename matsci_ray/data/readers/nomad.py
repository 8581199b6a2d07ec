"""NOMAD archive entries from the MatSciML LMDB devset.

NOMAD stores SI units: lengths in metres, energies in joules. They are converted with exact
factors (1 Å = 1e-10 m; 1 eV = 1.602176634e-19 J, exact since the 2019 SI). Targets: total
energy (``energies.total.value``), Fermi energy (``energies.fermi``), band gap
(``properties.electronic.band_structure_electronic.band_gap[0].value``) and the space group
number (``material.symmetry.space_group_number``). NOMAD has no formation energy.

Quirks: FHI-aims entries report slightly *negative* band gaps (the lowest unoccupied level lies
below the highest occupied one: a metal); those are stored as 0 eV, the MP convention for
metals. Total energies mix all-electron (FHI-aims, ~-1e5 eV) and pseudopotential (VASP) codes,
so they are not comparable across entries. ``group`` is NOMAD's ``material_id``, so entries
computing the same material never straddle splits.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from matsci_ray import keys
from matsci_ray.data.readers.lmdb_dict import LMDBDictReader
from matsci_ray.data.readers.lmdb_source import (
    RecordRejected,
    optional_float,
    optional_int,
)

METRE_TO_ANGSTROM = 1e10
JOULE_TO_EV = 1.0 / 1.602176634e-19
# Lattice vectors between 0.01 Å and 10 µm are taken to be in metres; anything else is not.
_METRE_RANGE = (1e-12, 1e-5)


def _get(obj: Any, *path: str | int) -> Any:
    """``obj[p0][p1]…``, or ``None`` where a step is missing (an absent target)."""
    for step in path:
        if isinstance(step, int):
            if not isinstance(obj, list | tuple) or len(obj) <= step:
                return None
        elif not isinstance(obj, dict):
            return None
        obj = obj[step] if isinstance(step, int) else obj.get(step)
    return obj


def _element_numbers(structure: dict[str, Any], n: int) -> np.ndarray:
    from ase.data import atomic_numbers as symbol_to_z

    names = structure.get("species_at_sites")
    if not isinstance(names, list) or len(names) != n:
        raise RecordRejected(f"species_at_sites does not list {n} sites")
    species = {s.get("name"): s for s in structure.get("species") or [] if isinstance(s, dict)}
    numbers = []
    for i, name in enumerate(names):
        symbols = [name]
        if name in species:
            symbols = species[name].get("chemical_symbols") or [name]
            occupancy = species[name].get("concentration") or [1.0]
            if len(symbols) != 1 or abs(float(occupancy[0]) - 1.0) > 1e-6:
                raise RecordRejected(f"partial occupancy at site {i} ({name}: {symbols})")
        z = symbol_to_z.get(symbols[0], 0)
        if z < 1:
            raise RecordRejected(f"site {i}: unknown element {symbols[0]!r}")
        numbers.append(z)
    return np.asarray(numbers, dtype=np.int64)


def _structure(record: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    structure = _get(record, "properties", "structures", "structure_original")
    if not isinstance(structure, dict):
        raise RecordRejected("no properties.structures.structure_original")
    try:
        lattice = np.asarray(structure["lattice_vectors"], dtype=np.float64).reshape(3, 3)
        positions = np.asarray(structure["cartesian_site_positions"], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as exc:
        raise RecordRejected(f"missing or unparsable lattice/positions: {exc}") from None
    if positions.ndim != 2 or positions.shape[1] != 3 or len(positions) == 0:
        raise RecordRejected(f"cartesian_site_positions has shape {positions.shape}")
    lengths = np.linalg.norm(lattice, axis=1)
    if not (lengths.min() > _METRE_RANGE[0] and lengths.max() < _METRE_RANGE[1]):
        raise RecordRejected(f"lattice vector lengths {lengths.tolist()} are not in metres")
    volume = optional_float(structure.get("cell_volume"), "cell_volume")
    det = abs(float(np.linalg.det(lattice)))
    if volume is not None and abs(det - volume) > 1e-6 * volume:
        raise RecordRejected(f"|det(lattice)|={det:.6g} m³ disagrees with cell_volume={volume:.6g}")
    # Positions must share the lattice's unit: a mismatch (Å vs m) puts atoms 1e10 cells away.
    frac = np.linalg.solve(lattice.T, positions.T).T
    if np.abs(frac).max() > 10:
        raise RecordRejected("cartesian_site_positions lie >10 cells away: unit mismatch")
    numbers = _element_numbers(structure, len(positions))
    dims = structure.get("dimension_types", [1, 1, 1])
    pbc = np.asarray([bool(d) for d in dims], dtype=bool)
    if pbc.shape != (3,):
        raise RecordRejected(f"dimension_types {dims!r} is not 3 flags")
    return numbers, positions * METRE_TO_ANGSTROM, lattice * METRE_TO_ANGSTROM, pbc


def _targets(record: dict[str, Any]) -> dict[str, Any]:
    targets: dict[str, Any] = {}
    total = optional_float(_get(record, "energies", "total", "value"), "energies.total.value")
    if total is not None:
        targets[keys.ENERGY] = total * JOULE_TO_EV
    fermi = optional_float(_get(record, "energies", "fermi"), "energies.fermi")
    if fermi is not None:
        targets[keys.EFERMI] = fermi * JOULE_TO_EV
    bands = _get(record, "properties", "electronic", "band_structure_electronic")
    if isinstance(bands, list):  # some archive versions list one entry per spin/calculation
        bands = bands[0] if bands else None
    gap = optional_float(_get(bands, "band_gap", 0, "value"), "band_gap")
    if gap is not None:
        targets[keys.BAND_GAP] = max(gap * JOULE_TO_EV, 0.0)
    number = optional_int(
        _get(record, "material", "symmetry", "space_group_number"), "space_group_number"
    )
    if number is not None:
        targets[keys.SPACE_GROUP] = number
    return targets


def convert_nomad(record: dict[str, Any]) -> dict[str, Any]:
    """Canonical structure and targets of one NOMAD entry (keyword arguments for ``Record``)."""
    targets = _targets(record)
    if not targets:
        raise RecordRejected("no target present")
    numbers, positions, cell, pbc = _structure(record)
    material = _get(record, "material", "material_id")
    return {
        "atomic_numbers": numbers,
        "positions": positions,
        "cell": cell,
        "pbc": pbc,
        "targets": targets,
        "group": f"nomad:{material}" if isinstance(material, str) and material else None,
    }


class NomadReader(LMDBDictReader):
    name: ClassVar[str] = "nomad"
    dataset: ClassVar[str] = "nomad"
    targets: ClassVar[tuple[str, ...]] = (
        keys.ENERGY,
        keys.EFERMI,
        keys.BAND_GAP,
        keys.SPACE_GROUP,
    )

    convert = staticmethod(convert_nomad)
