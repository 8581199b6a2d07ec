"""Stress conversions into the canonical column: eV/Å³, ASE's sign, Voigt order."""

from __future__ import annotations

import numpy as np
import pytest
from ase import units
from ase.build import bulk
from ase.calculators.emt import EMT

from matsci_ray import keys as K
from matsci_ray.data.units import (
    KBAR,
    as_voigt,
    matrix_from_voigt,
    stress_from_gpa,
    stress_from_kbar_vasp,
    voigt_from_matrix,
)

# a symmetric tensor with six different components, so a wrong Voigt order shows
TENSOR = np.array([[1.0, 6.0, 5.0], [6.0, 2.0, 4.0], [5.0, 4.0, 3.0]])


def test_units_agree_with_ase() -> None:
    # ASE's default constants are CODATA 2014's; ours the exact SI 2019 charge
    assert pytest.approx(units.GPa, rel=1e-7) == K.GPA
    assert pytest.approx(units.GPa / 10, rel=1e-7) == KBAR


def test_voigt_order_is_ases() -> None:
    assert K.VOIGT_ORDER == ("xx", "yy", "zz", "yz", "xz", "xy")
    np.testing.assert_array_equal(voigt_from_matrix(TENSOR), [1, 2, 3, 4, 5, 6])
    np.testing.assert_array_equal(matrix_from_voigt(voigt_from_matrix(TENSOR)), TENSOR)
    # ASE's own calculator: its 3×3 stress and its Voigt vector, in the same order
    atoms = bulk("Cu", "fcc", a=3.5) * (1, 1, 2)
    atoms.set_cell(atoms.cell.array @ [[1.0, 0.02, 0.0], [0.02, 1.0, 0.01], [0.0, 0.01, 1.0]])
    atoms.calc = EMT()
    np.testing.assert_allclose(
        voigt_from_matrix(atoms.get_stress(voigt=False)), atoms.get_stress(), atol=1e-15
    )


def test_vasp_kbar_flips_the_sign() -> None:
    # VASP reports compression as positive kbar; ASE (and the column) as negative eV/Å³
    compressed = np.diag([10.0, 10.0, 10.0])  # 10 kbar = 1 GPa of compression
    np.testing.assert_allclose(stress_from_kbar_vasp(compressed), [-K.GPA] * 3 + [0.0] * 3)
    np.testing.assert_allclose(stress_from_kbar_vasp(TENSOR), -0.1 * K.GPA * np.arange(1, 7))
    np.testing.assert_allclose(stress_from_gpa(np.arange(1, 7)), K.GPA * np.arange(1, 7))


def test_shapes_and_asymmetry_are_refused() -> None:
    assert as_voigt(np.arange(6.0)).shape == (6,)
    with pytest.raises(ValueError, match="3×3 tensor or 6 Voigt"):
        as_voigt(np.zeros(9))
    skew = TENSOR.copy()
    skew[0, 1] += 0.5
    with pytest.raises(ValueError, match="not symmetric"):
        voigt_from_matrix(skew)
