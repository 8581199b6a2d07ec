"""Validation by physics, the same for every source and for prediction.

A check returns ``None`` for a sound structure or a reason string ``"category: detail"``; the
category (before the colon) is what the manifest counts rejects by. :func:`check_structure`
judges a geometry alone (what ``predict`` and ``MatSciCalculator`` are given);
:func:`check_record` runs the same checks and also judges the labels, so ingest refuses exactly
what prediction refuses, and more.
"""

from __future__ import annotations

import functools
from collections.abc import Collection
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import vesin

from matsci_ray.data.record import Record
from matsci_ray.keys import STRESS, TARGETS

MAX_Z = 118  # the periodic table; a model may embed fewer (``check_structure(max_z=...)``)
_HARTREE = 27.211386  # eV


@dataclass(frozen=True)
class Limits:
    """Physical sanity bounds. Defaults catch unit mistakes without refusing real structures."""

    min_distance: float = 0.5  # Å, under periodic boundaries, self-images included
    min_volume_per_atom: float = 1.0  # Å³; a cell in metres or nm lands far outside
    max_volume_per_atom: float = 10_000.0  # Å³; slabs with vacuum stay well below this
    max_atoms: int | None = 5_000  # a record-size guard for shards; None: no cap
    # Å, along a non-periodic axis: the cell vector and the atoms' span. The OC20 sample's
    # slab cells are 28-47 Å along the surface normal (18-29 Å of vacuum above 7-20 Å of
    # slab); a cell in pm, or a structure whose fragments fly apart, lands far beyond.
    max_nonperiodic_extent: float = 200.0
    # Å added to the atoms' span along each non-periodic axis when a partly periodic cell's
    # volume per atom is judged: a monolayer spans 0 Å but fills a layer about this thick.
    layer_thickness: float = 2.0
    # Total energies (targets marked ``extensive``), per atom. Above: pseudopotential and
    # all-electron totals are negative; totals referenced to free atoms (VASP's PAW atoms) or
    # to a slab and gas molecules (OC20) put even strained structures a few eV/atom above 0.
    max_energy_per_atom: float = 100.0  # eV
    # Below: no total is lower than its atoms' all-electron energies, which the Thomas-Fermi
    # energy bounds; the sample's all-electron NOMAD totals (Th, Rn, Bi compounds) reach 0.99
    # of it, since relativity deepens heavy atoms' cores, hence the margin.
    all_electron_margin: float = 2.0


DEFAULT_LIMITS = Limits()
# Prediction judges geometry by the same limits; the atom cap only bounds a shard's rows.
PREDICT_LIMITS = Limits(max_atoms=None)


class Geometry(Protocol):
    """A structure without labels: a :class:`Record`, a :class:`Structure`."""

    @property
    def atomic_numbers(self) -> np.ndarray: ...
    @property
    def positions(self) -> np.ndarray: ...
    @property
    def cell(self) -> np.ndarray: ...
    @property
    def pbc(self) -> np.ndarray: ...


@dataclass(frozen=True)
class Structure:
    """Geometry to predict on: atomic numbers, positions (Å), cell (Å, rows) and pbc."""

    atomic_numbers: np.ndarray
    positions: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray


def check_structure(
    structure: Geometry,
    limits: Limits = PREDICT_LIMITS,
    max_z: int = MAX_Z,
    elements: Collection[int] | None = None,
) -> str | None:
    """Why no model should score ``structure`` (``max_z``: the largest atomic number the model
    embeds; ``elements``: the only ones it was built for, if it has such a table), or ``None``
    if it is sound."""
    reason = _check_geometry(structure, limits, max_z) or _check_table(structure, elements)
    return reason if reason is not None else _check_distances(structure, limits)


def check_record(record: Record, limits: Limits = DEFAULT_LIMITS) -> str | None:
    """Why ``record`` must be rejected, or ``None`` if it is sound."""
    reason = _check_geometry(record, limits, MAX_Z) or _check_targets(record, limits)
    # distances last: the only check that costs a neighbour search
    return reason if reason is not None else _check_distances(record, limits)


def _check_geometry(s: Geometry, limits: Limits, max_z: int) -> str | None:
    """Every geometry check but distances, cheapest first; later checks rely on earlier."""
    reason = _check_shapes(s, limits) or _check_elements(s, max_z) or _check_finite(s)
    return reason or _check_cell(s, limits) or _check_extent(s, limits)


def _check_shapes(s: Geometry, limits: Limits) -> str | None:
    z = np.asarray(s.atomic_numbers)
    if z.ndim != 1:
        return f"shape: atomic_numbers has shape {z.shape}, expected (n,)"
    n = z.shape[0]
    if n == 0:
        return "shape: the structure has no atoms"
    if limits.max_atoms is not None and n > limits.max_atoms:
        return f"shape: {n} atoms exceeds max_atoms={limits.max_atoms}"
    if np.asarray(s.positions).shape != (n, 3):
        return f"shape: positions {np.asarray(s.positions).shape} != ({n}, 3)"
    if np.asarray(s.cell).shape != (3, 3):
        return f"shape: cell {np.asarray(s.cell).shape} != (3, 3)"
    if np.asarray(s.pbc).shape != (3,):
        return f"shape: pbc {np.asarray(s.pbc).shape} != (3,)"
    return None


def _check_elements(s: Geometry, max_z: int) -> str | None:
    z = np.asarray(s.atomic_numbers)
    if not np.issubdtype(z.dtype, np.integer):
        return f"element: atomic numbers must be integers, got {z.dtype}"
    bad = np.flatnonzero((z < 1) | (z > max_z))
    if bad.size == 0:
        return None
    what = "" if max_z == MAX_Z else " (what the model embeds)"
    return f"element: atom {bad[0]} has atomic number {z[bad[0]]}, outside 1..{max_z}{what}"


def _check_table(s: Geometry, elements: Collection[int] | None) -> str | None:
    if elements is None:
        return None
    z = np.asarray(s.atomic_numbers)
    bad = np.flatnonzero(~np.isin(z, np.fromiter(elements, dtype=np.int64)))
    if bad.size == 0:
        return None
    return (
        f"element: atom {bad[0]} has atomic number {z[bad[0]]}, not among the elements the "
        f"model was built for ({', '.join(map(str, sorted(elements)))})"
    )


def _check_finite(s: Geometry) -> str | None:
    if not np.isfinite(np.asarray(s.positions, dtype=np.float64)).all():
        return "non-finite: positions contain NaN or inf"
    if not np.isfinite(np.asarray(s.cell, dtype=np.float64)).all():
        return "non-finite: cell contains NaN or inf"
    return None


def _check_cell(s: Geometry, limits: Limits) -> str | None:
    periodic = np.asarray(s.pbc, dtype=bool)
    if not periodic.any():
        return None
    cell = np.asarray(s.cell, dtype=np.float64)
    volume = abs(float(np.linalg.det(cell)))
    if volume <= 1e-6:
        return f"cell: volume {volume:.3g} Å³ is not positive for a periodic structure"
    per_atom = _occupied_volume(s, volume, limits.layer_thickness) / len(s.atomic_numbers)
    if limits.min_volume_per_atom <= per_atom <= limits.max_volume_per_atom:
        return None
    how = "" if periodic.all() else " (periodic cell × atoms' span along non-periodic axes)"
    return (
        f"cell: {per_atom:.3g} Å³ per atom{how} is implausible "
        f"(allowed {limits.min_volume_per_atom}..{limits.max_volume_per_atom}; unit error?)"
    )


def _occupied_volume(s: Geometry, volume: float, pad: float) -> float:
    """The cell's volume, with each non-periodic axis cut down to what the atoms occupy.

    Along a non-periodic axis the cell's length is vacuum of the user's choosing (a slab's
    25 Å, or 400 Å), not the structure's volume, so the unit-mistake test of a bulk cell
    (volume per atom) is applied to the periodic part times the atoms' own thickness: a slab's
    area per atom times its depth, a wire's length per atom times its cross-section.
    """
    for _, height, span in _nonperiodic_spans(s):
        volume *= (span + pad) / height
    return volume


def _nonperiodic_spans(s: Geometry) -> list[tuple[int, float, float]]:
    """For each non-periodic axis ``k`` of a full-rank cell: ``(k, height, span)``, the cell's
    height along the normal to the other two vectors and the atoms' span along that normal."""
    cell = np.asarray(s.cell, dtype=np.float64)
    inverse = np.linalg.inv(cell)  # column k: normal to the other two vectors, |.| = 1/height
    fractional = np.asarray(s.positions, dtype=np.float64) @ inverse
    out = []
    for k in np.flatnonzero(~np.asarray(s.pbc, dtype=bool)):
        height = 1.0 / float(np.linalg.norm(inverse[:, k]))
        out.append((int(k), height, float(np.ptp(fractional[:, k])) * height))
    return out


def _check_extent(s: Geometry, limits: Limits) -> str | None:
    """No vacuum beyond ``max_nonperiodic_extent`` along a non-periodic axis: neither the cell
    vector there nor the atoms' span. A structure periodic in all three axes is bounded by its
    volume per atom instead; one periodic in none by its atoms' bounding box."""
    periodic = np.asarray(s.pbc, dtype=bool)
    limit = limits.max_nonperiodic_extent
    if periodic.all():
        return None
    if not periodic.any():
        spans = np.ptp(np.asarray(s.positions, dtype=np.float64), axis=0)
        k = int(np.argmax(spans))
        if spans[k] > limit:
            return f"vacuum: the atoms span {spans[k]:.4g} Å along {'xyz'[k]} (> {limit} Å)"
        return None
    lengths = np.linalg.norm(np.asarray(s.cell, dtype=np.float64), axis=1)
    for k, _, span in _nonperiodic_spans(s):
        if lengths[k] > limit:
            return (
                f"vacuum: cell vector {'abc'[k]} is {lengths[k]:.4g} Å along a non-periodic "
                f"axis (> {limit} Å)"
            )
        if span > limit:
            return (
                f"vacuum: the atoms span {span:.4g} Å along non-periodic axis {'abc'[k]} "
                f"(> {limit} Å)"
            )
    return None


def _check_targets(r: Record, limits: Limits) -> str | None:
    if not r.targets:
        return "label: record has no target"
    if r.targets.get(STRESS) is not None and not np.asarray(r.pbc, dtype=bool).all():
        # a stress is per cell volume: a structure not periodic in 3 directions has none
        return "label: stress on a structure that is not periodic along a, b and c"
    for name, value in r.targets.items():
        reason = _check_target(name, value, np.asarray(r.atomic_numbers), limits)
        if reason is not None:
            return reason
    return None


def _check_target(name: str, value: object, z: np.ndarray, limits: Limits) -> str | None:
    spec = TARGETS.get(name)
    if spec is None:
        return f"label: unknown target {name!r}"
    if spec.kind == "bool":
        if not isinstance(value, bool | np.bool_):
            return f"label: {name} must be a bool, got {value!r}"
        return None
    arr = np.asarray(value)
    expected = _target_shape(spec.kind, len(z))
    if arr.shape != expected:
        if expected == ():
            return f"label: {name} must be a scalar, got shape {arr.shape}"
        return f"label: {name} has shape {arr.shape}, expected {expected}"
    if spec.kind == "class" and float(arr) != int(arr):
        return f"label: {name} must be an integer class, got {value!r}"
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        return f"non-finite: {name} contains NaN or inf"
    if spec.low is not None and arr.size and arr.min() < spec.low:
        return f"range: {name} = {arr.min():.6g} below {spec.low} {spec.unit}".rstrip()
    if spec.high is not None and arr.size and arr.max() > spec.high:
        return f"range: {name} = {arr.max():.6g} above {spec.high} {spec.unit}".rstrip()
    if spec.extensive:  # a total energy: bounded per atom, by what its atoms can hold
        return _check_total_energy(name, float(arr), z, limits)
    return None


def _target_shape(kind: str, natoms: int) -> tuple[int, ...]:
    """The array shape a target of ``kind`` has on a structure of ``natoms`` atoms."""
    if kind == "per_atom_vector":
        return (natoms, 3)
    if kind.startswith("per_atom"):
        return (natoms,)
    return (6,) if kind == "voigt" else ()


def _check_total_energy(name: str, energy: float, z: np.ndarray, limits: Limits) -> str | None:
    n = len(z)
    said = f"range: {name} = {energy:.6g} eV ({energy / n:.4g} eV/atom)"
    if energy > limits.max_energy_per_atom * n:
        return f"{said} above {limits.max_energy_per_atom} eV/atom"
    floor = -limits.all_electron_margin * _thomas_fermi_energy(z)
    if energy < floor:
        return (
            f"{said} below {floor / n:.4g} eV/atom, {limits.all_electron_margin} × its atoms' "
            "all-electron (Thomas-Fermi) energy; unit error?"
        )
    return None


def _thomas_fermi_energy(z: np.ndarray) -> float:
    """Sum of the atoms' Thomas-Fermi energies, -0.7687 Z^(7/3) Ha each, in eV (negated): the
    statistical atom binds more than the real one (H: 0.77 against 0.5 Ha; Rn: 25,100 against
    21,900 non-relativistic), so no all-electron total sits far below it."""
    return float(0.7687 * np.sum(np.asarray(z, dtype=np.float64) ** (7 / 3))) * _HARTREE


# vesin bins space into cells of about the cutoff: a 0.5 Å search in a slab with vacuum walks
# a great many empty cells, so searching 3 Å and filtering is much faster
# (benchmarks/README.md, "Where ingest time goes").
_SEARCH_CUTOFF = 3.0


@functools.cache
def _neighbor_list(cutoff: float) -> vesin.NeighborList:
    return vesin.NeighborList(cutoff=cutoff, full_list=False, n_threads=1)


def _check_distances(r: Geometry, limits: Limits) -> str | None:
    """No two atoms, nor an atom and its own image, closer than ``limits.min_distance``."""
    positions = np.ascontiguousarray(r.positions, dtype=np.float64)
    periodic = np.asarray(r.pbc, dtype=bool)
    box = np.ascontiguousarray(r.cell, dtype=np.float64)
    if not periodic.any():
        box = np.zeros((3, 3))
    nl = _neighbor_list(max(limits.min_distance, _SEARCH_CUTOFF))
    i, j, d = nl.compute(positions, box, periodic.tolist(), quantities="ijd")
    close = d < limits.min_distance
    if not close.any():
        return None
    k = int(np.flatnonzero(close)[np.argmin(d[close])])
    pair = f"atom {i[k]} and its own image" if i[k] == j[k] else f"atoms {i[k]} and {j[k]}"
    return f"distance: {pair} are {d[k]:.3f} Å apart (< {limits.min_distance} Å)"
