"""Stress conversions into the canonical ``stress`` column (:data:`matsci_ray.keys.STRESS`).

Canonical: eV/Å³, ASE's sign (σ = (1/V) ∂E/∂ε, negative for a compressed cell that pushes
outwards) and Voigt order ``xx, yy, zz, yz, xz, xy``. Sources differ in all three:

* VASP (OUTCAR, vasprun, and MPtrj and pymatgen, which copy it) reports kbar with the opposite
  sign: positive under compression. 1 kbar = 0.1 GPa.
* Some sources give GPa in ASE's sign.
* Many store the full 3×3 tensor rather than Voigt components.

Each helper accepts a 3×3 tensor or a Voigt 6-vector and returns a float64 Voigt 6-vector; a
value that is neither raises ``ValueError``, which a reader turns into a reject of that record.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from matsci_ray.keys import GPA

KBAR = 0.1 * GPA  # eV/Å³

# Voigt component k is the tensor entry (_VOIGT_ROWS[k], _VOIGT_COLS[k]).
_VOIGT_ROWS = np.array([0, 1, 2, 1, 0, 0])
_VOIGT_COLS = np.array([0, 1, 2, 2, 2, 1])
# A tensor whose off-diagonal pairs differ by more than this (relative to its largest entry)
# is not a stress: a reader holding something else, or a transposed layout, is caught here.
_SYMMETRY_TOLERANCE = 1e-6


def voigt_from_matrix(matrix: ArrayLike) -> np.ndarray:
    """The Voigt 6-vector of a symmetric 3×3 tensor; ``ValueError`` if it is not symmetric."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (3, 3):
        raise ValueError(f"a stress tensor must be 3×3, got shape {m.shape}")
    scale = max(float(np.abs(m).max()), 1e-12)
    if np.abs(m - m.T).max() > _SYMMETRY_TOLERANCE * scale:
        raise ValueError(f"stress tensor is not symmetric: {m.tolist()}")
    return 0.5 * (m + m.T)[_VOIGT_ROWS, _VOIGT_COLS]


def matrix_from_voigt(voigt: ArrayLike) -> np.ndarray:
    """The symmetric 3×3 tensor of a Voigt 6-vector."""
    v = np.asarray(voigt, dtype=np.float64).reshape(6)
    m = np.empty((3, 3))
    m[_VOIGT_ROWS, _VOIGT_COLS] = v
    m[_VOIGT_COLS, _VOIGT_ROWS] = v
    return m


def as_voigt(stress: ArrayLike) -> np.ndarray:
    """A Voigt 6-vector from a 3×3 tensor or 6 components (units and sign unchanged)."""
    arr = np.asarray(stress, dtype=np.float64)
    if arr.shape == (3, 3):
        return voigt_from_matrix(arr)
    if arr.size == 6:
        return arr.reshape(6).copy()
    raise ValueError(f"stress must be a 3×3 tensor or 6 Voigt components, got {arr.shape}")


def stress_from_kbar_vasp(stress: ArrayLike) -> np.ndarray:
    """VASP's kbar, positive under compression (MPtrj, pymatgen), into the canonical form."""
    return -KBAR * as_voigt(stress)


def stress_from_gpa(stress: ArrayLike) -> np.ndarray:
    """GPa in ASE's sign into the canonical form."""
    return GPA * as_voigt(stress)
