"""Stress references shared by the stress tests: central differences of the energy under
strain, and ASE's EMT on strained, rattled Cu cells."""

from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT

# (row, column) of each Voigt component xx, yy, zz, yz, xz, xy in a 3 x 3 stress
VOIGT = ([0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1])


def strain_derivative(energy_of, volume: float | np.ndarray, h: float) -> np.ndarray:
    """``(1/V) ∂E/∂ε_ij``, ``(..., 3, 3)``, by central differences, each ``ε`` one entry (not
    symmetrised) applied as ``r → r (I + ε)`` to positions and cell rows.
    ``energy_of(deformation)`` gives the energy of the deformed structure, or an array of
    energies of several structures deformed alike (each with its ``volume``)."""
    columns = []
    for i, j in np.ndindex(3, 3):
        energies = []
        for sign in (1.0, -1.0):
            deformation = np.eye(3)
            deformation[i, j] += sign * h
            energies.append(np.asarray(energy_of(deformation)))
        columns.append((energies[0] - energies[1]) / (2 * h))
    derivative = np.stack(columns, axis=-1).reshape(*np.shape(columns[0]), 3, 3)
    return derivative / np.asarray(volume)[..., None, None]


def emt_cells(count: int, seed: int) -> list[Atoms]:
    """Cubic 4-atom Cu cells, strained by up to 4 % (shear included) and rattled, with EMT
    energies, forces and stresses attached."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
        strain = rng.uniform(-0.04, 0.04, (3, 3))
        atoms.set_cell(atoms.cell.array @ (np.eye(3) + 0.5 * (strain + strain.T)), True)
        atoms.positions += rng.normal(0.0, 0.05, atoms.positions.shape)
        atoms.calc = EMT()
        atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
        out.append(atoms)
    return out
