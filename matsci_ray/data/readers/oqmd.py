"""OQMD formation-energy entries from the MatSciML LMDB devset.

Targets: ``delta_e`` -> formation energy per atom (eV/atom), ``band_gap`` (eV), and the space
group number mapped from OQMD's Hermann–Mauguin ``spacegroup`` symbol.

Quirk: despite its name, ``cart_coords`` holds *fractional* coordinates in every devset record
(they equal the ``"Mn @ 0.75 0.25 0.5"`` strings of ``sites``). The convention is decided per
record against ``sites`` (see ``resolve_coordinates``), after checking the cell is in Å by
comparing ``|det(cell)|`` with ``volume``.
"""

from __future__ import annotations

import functools
import re
from typing import Any, ClassVar

import numpy as np

from matsci_ray import keys
from matsci_ray.data.readers.lmdb_dict import LMDBDictReader
from matsci_ray.data.readers.lmdb_source import (
    RecordRejected,
    optional_float,
    resolve_coordinates,
)

_VOLUME_RTOL = 1e-3  # OQMD rounds volume to 3 decimals
# Pre-2002 symbols (the "e" glide was written a/b) that pymatgen's tables lack.
_LEGACY_SYMBOLS = {"Cmca": 64, "Cmma": 67, "Ccca": 68, "Aba2": 41, "Abm2": 39}


def _normalise_symbol(symbol: str) -> str:
    # "P2_1/c", "P 21/c" and "P21/c" are one symbol; ":1"/":2" name an origin choice.
    return re.sub(r"[\s_]", "", symbol).split(":")[0]


@functools.cache
def _symbol_table() -> dict[str, int | None]:
    """Normalised Hermann–Mauguin symbol -> space group number; ``None`` if ambiguous.

    Built from every setting in pymatgen's symmetry data (full, short and universal symbols).
    Dropping underscores makes a few short symbols collide (``P-3m`` is both P-31m, 162, and
    P-3m1, 164): those map to ``None`` and the target is omitted rather than guessed.
    """
    from pymatgen.symmetry.groups import SpaceGroup

    numbers: dict[str, set[int]] = {}
    for entry in SpaceGroup.SYMM_OPS:
        for field in ("hermann_mauguin", "universal_h_m", "short_h_m", "hermann_mauguin_u"):
            numbers.setdefault(_normalise_symbol(entry[field]), set()).add(int(entry["number"]))
    for symbol, number in _LEGACY_SYMBOLS.items():
        numbers.setdefault(symbol, set()).add(number)
    return {s: (next(iter(n)) if len(n) == 1 else None) for s, n in numbers.items()}


def space_group_number(symbol: Any) -> int | None:
    """Space group number of a Hermann–Mauguin symbol, or ``None`` if unknown or ambiguous."""
    if not isinstance(symbol, str) or not symbol.strip():
        return None
    table = _symbol_table()
    key = _normalise_symbol(symbol)
    if key in table:
        return table[key]
    if key[:1] == "R" and key[-1:] in ("H", "R"):  # rhombohedral setting suffix
        return table.get(key[:-1])
    return None


def _parse_sites(sites: Any) -> tuple[list[str], np.ndarray] | None:
    """Element symbols and fractional coordinates of ``["Mn @ 0.75 0.25 0.5", ...]``."""
    if not isinstance(sites, list) or not sites:
        return None
    symbols, frac = [], []
    for site in sites:
        if not isinstance(site, str) or "@" not in site:
            return None
        element, coords = site.split("@", 1)
        try:
            xyz = [float(v) for v in coords.split()]
        except ValueError:
            return None
        if len(xyz) != 3:
            return None
        symbols.append(element.strip())
        frac.append(xyz)
    return symbols, np.asarray(frac, dtype=np.float64)


def convert_oqmd(record: dict[str, Any]) -> dict[str, Any]:
    """Canonical structure and targets of one OQMD record (keyword arguments for ``Record``)."""
    from ase.data import atomic_numbers as symbol_to_z

    try:
        cell = np.asarray(record["cell"], dtype=np.float64).reshape(3, 3)
        coords = np.asarray(record["cart_coords"], dtype=np.float64)
        numbers = np.asarray(record["atomic_numbers"], dtype=np.int64)
    except (KeyError, TypeError, ValueError) as exc:
        raise RecordRejected(f"missing or unparsable structure field: {exc}") from None
    n = len(numbers)
    if numbers.ndim != 1 or coords.shape != (n, 3):
        raise RecordRejected(f"cart_coords {coords.shape} do not fit {n} atomic_numbers")
    if record.get("natoms") is not None and record["natoms"] != n:
        raise RecordRejected(f"natoms={record['natoms']} but {n} atoms listed")
    volume = optional_float(record.get("volume"), "volume")
    det = abs(float(np.linalg.det(cell)))
    if volume is not None and abs(det - volume) > _VOLUME_RTOL * volume:
        raise RecordRejected(f"|det(cell)|={det:.4g} Å³ disagrees with volume={volume:.4g}")

    reference = None
    parsed = _parse_sites(record.get("sites"))
    if parsed is not None:
        symbols, reference = parsed
        site_z = [symbol_to_z.get(s, -1) for s in symbols]
        if len(site_z) != n or site_z != numbers.tolist():
            raise RecordRejected("elements in sites disagree with atomic_numbers")
    positions, how = resolve_coordinates(coords, cell, reference)
    if positions is None:
        raise RecordRejected(f"cannot tell whether cart_coords are fractional: {how}")

    targets: dict[str, Any] = {}
    for source, name in (("delta_e", keys.FORMATION_ENERGY), ("band_gap", keys.BAND_GAP)):
        value = optional_float(record.get(source), source)
        if value is not None:
            targets[name] = value
    number = space_group_number(record.get("spacegroup"))
    if number is not None:
        targets[keys.SPACE_GROUP] = number
    if not targets:
        raise RecordRejected("no target present")
    return {
        "atomic_numbers": numbers,
        "positions": positions,
        "cell": cell,
        "pbc": np.ones(3, dtype=bool),
        "targets": targets,
    }


class OQMDReader(LMDBDictReader):
    name: ClassVar[str] = "oqmd"
    dataset: ClassVar[str] = "oqmd"
    targets: ClassVar[tuple[str, ...]] = (keys.FORMATION_ENERGY, keys.BAND_GAP, keys.SPACE_GROUP)

    convert = staticmethod(convert_oqmd)
