"""Every encoder's stress is the strain derivative of its energy: float64 central differences
on the same graph (themselves checked against ASE's EMT stress), symmetric, rotating as a
tensor, absent without a cell, and leaving energy and forces as they were."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.emt import EMT

from matsci_ray import keys as K
from matsci_ray.data.units import matrix_from_voigt
from matsci_ray.models import model_names
from tests.strain import VOIGT, emt_cells, strain_derivative
from tests.test_encoder_contract import ENERGY, crystals, small_encoder, to_batch, with_heads

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_finite_difference_is_ases_stress() -> None:
    """The derivative the models are checked against is ASE's stress (sign and order)."""
    atoms = emt_cells(1, seed=5)[0]
    reference = atoms.get_stress()

    def energy_of(deformation: np.ndarray) -> float:
        other = atoms.copy()
        other.set_cell(atoms.cell.array @ deformation, scale_atoms=True)
        other.calc = EMT()
        return other.get_potential_energy()

    numeric = strain_derivative(energy_of, atoms.get_volume(), 1e-5)[VOIGT]
    np.testing.assert_allclose(numeric, reference, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", model_names())
def test_stress_is_the_strain_derivative_of_the_energy(name: str) -> None:
    """float64: every Voigt component of every structure equals (1/V) ∂E/∂ε by central
    differences on the same graph, and ∂E/∂ε_ij = ∂E/∂ε_ji (a symmetric stress)."""
    model = with_heads(small_encoder(name))
    batch = to_batch(crystals())
    stress = model(batch, stress=True)[ENERGY][K.STRESS].detach()
    assert stress.shape == (batch.num_graphs, 6) and stress.dtype == torch.float64
    largest = stress.abs().max().item()
    assert largest > 1e-9  # not a vacuous comparison

    def energy_of(deformation: np.ndarray) -> np.ndarray:
        """Every structure of the batch deformed alike, on the same graph."""
        f = torch.from_numpy(deformation)
        deformed = batch.clone()
        deformed.pos, deformed.cell = batch.pos.detach() @ f, batch.cell @ f
        with torch.no_grad():
            return model(deformed, forces=False)[ENERGY]["value"].numpy()

    volume = torch.linalg.det(batch.cell).abs().numpy()
    derivative = strain_derivative(energy_of, volume, 1e-4)
    tolerance = {"rtol": 1e-4, "atol": 1e-4 * largest}
    np.testing.assert_allclose(derivative, derivative.transpose(0, 2, 1), **tolerance)
    np.testing.assert_allclose(stress.numpy(), derivative[:, VOIGT[0], VOIGT[1]], **tolerance)


@pytest.mark.parametrize("name", model_names())
def test_stress_leaves_energy_and_forces_unchanged(name: str) -> None:
    model = with_heads(small_encoder(name))
    batch = to_batch(crystals())
    plain = model(batch, forces=True, stress=False)[ENERGY]
    stressed = model(batch, forces=True, stress=True)[ENERGY]
    assert K.STRESS not in plain
    torch.testing.assert_close(stressed["value"], plain["value"])
    torch.testing.assert_close(stressed["forces"], plain["forces"])
    assert batch.pos.shape == plain["forces"].shape  # the caller's batch is not strained


def test_a_structure_without_a_cell_has_no_stress() -> None:
    model = with_heads(small_encoder("egnn"))
    molecule = Atoms("H2O", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]], pbc=False)
    batch = to_batch([molecule, crystals()[0]])
    pred = model(batch, stress=True)[ENERGY]
    assert torch.isnan(pred[K.STRESS][0]).all() and torch.isfinite(pred[K.STRESS][1]).all()
    assert torch.isfinite(pred["forces"]).all()


def test_stress_rotates_as_a_tensor() -> None:
    model = with_heads(small_encoder("gala"))
    atoms = crystals()[2]
    rotation = np.linalg.qr(np.random.default_rng(4).normal(size=(3, 3)))[0]
    rotated = atoms.copy()
    rotated.set_cell(atoms.cell.array @ rotation.T, scale_atoms=False)
    rotated.positions = atoms.positions @ rotation.T
    stresses = [
        model(to_batch([a]), stress=True)[ENERGY][K.STRESS][0].detach().numpy()
        for a in (atoms, rotated)
    ]
    want = rotation @ matrix_from_voigt(stresses[0]) @ rotation.T
    np.testing.assert_allclose(matrix_from_voigt(stresses[1]), want, atol=1e-5 * abs(want).max())
