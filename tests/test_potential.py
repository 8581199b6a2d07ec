"""Models with heads on real sample structures: conservative forces and invariances.

Every encoder is paired with every head kind (extensive energy with forces, intensive scalar,
binary, multiclass) and run through the same graph transform and collation as training.
"""

from __future__ import annotations

import json

import ase.io
import numpy as np
import pytest
import torch
from ase import Atoms
from scipy.spatial.transform import Rotation

from matsci_ray.graphs.batching import RadiusGraphTransform, rows_to_pyg_batch
from matsci_ray.inference import atoms_to_columns
from matsci_ray.models import build_encoder
from matsci_ray.potential import MatSciModel
from matsci_ray.tasks.registry import TASKS
from tests.samples import SAMPLES

SMALL = {
    "egnn": {"hidden_dim": 16, "num_layers": 2, "mlp_dim": 32, "num_rbf": 8},
    "megnet": {"dim": 8, "num_blocks": 2},
    "gala": {"dim": 16, "heads": 2, "num_layers": 2, "ffn_dim": 32},
}
TASK_NAMES = [
    "lips-forces",
    "mp-formation-energy",
    "mp-band-gap",
    "mp-stability",
    "mp-space-group",
]
CUTOFF = 4.0


def _model(name: str) -> MatSciModel:
    torch.manual_seed(0)
    encoder = build_encoder(name, CUTOFF, SMALL[name])
    model = MatSciModel(encoder, [TASKS[t] for t in TASK_NAMES], head_hidden=16).double()
    for head in model.heads.values():  # non-trivial normalisers, as after fit_normalisation
        for buffer_name, buffer in head.named_buffers():
            buffer.copy_(torch.rand_like(buffer) + 0.5 if buffer_name != "mean" else buffer)
    return model.eval()


def _batch(structures: list[Atoms]) -> object:
    rows = RadiusGraphTransform(CUTOFF)(atoms_to_columns(structures))
    batch = rows_to_pyg_batch(rows, [])
    batch.pos = batch.pos.double()
    batch.cell = batch.cell.double()
    batch.cell_offsets = batch.cell_offsets.double()
    return batch


def _structures() -> list[Atoms]:
    from pymatgen.core import Structure
    from pymatgen.io.ase import AseAtomsAdaptor

    lips = ase.io.read(SAMPLES / "lips" / "lips_devset.extxyz", 0)
    oc20 = ase.io.read(SAMPLES / "oc20" / "trajectories" / "random1000100.traj", 0)
    line = (SAMPLES / "materials_project" / "summary_docs.jsonl").read_text().splitlines()[5]
    mp = AseAtomsAdaptor.get_atoms(Structure.from_dict(json.loads(line)["structure"]))
    return [lips[:24], oc20, mp]  # a LiPS fragment keeps the finite differences quick


def _predict(model: MatSciModel, structures: list[Atoms]) -> dict[str, torch.Tensor]:
    preds = model(_batch(structures), forces=True)
    out = {name: p["value"].detach() for name, p in preds.items()}
    out["forces"] = preds["lips-forces"]["forces"].detach()
    return out


@pytest.mark.parametrize("name", ["egnn", "megnet", "gala"])
def test_forces_are_minus_numerical_energy_gradient(name: str) -> None:
    model = _model(name)
    atoms = _structures()[0]
    batch = _batch([atoms])
    forces = model(batch, forces=True)["lips-forces"]["forces"].detach()
    h = 1e-5
    rng = np.random.default_rng(0)
    for atom in rng.choice(len(atoms), size=4, replace=False):
        for axis in range(3):
            energies = []
            for step in (h, -h):
                displaced = batch.clone()
                displaced.pos = batch.pos.detach().clone()
                displaced.pos[atom, axis] += step
                energies.append(model(displaced, forces=False)["lips-forces"]["value"].item())
            numeric = -(energies[0] - energies[1]) / (2 * h)
            assert forces[atom, axis].item() == pytest.approx(numeric, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("name", ["egnn", "megnet", "gala"])
def test_predictions_invariant_to_rotation_translation_and_image(name: str) -> None:
    model = _model(name)
    structures = _structures()
    reference = _predict(model, structures)

    rotation = Rotation.random(random_state=1).as_matrix()
    moved = []
    for atoms in structures:
        other = atoms.copy()
        other.set_cell(atoms.cell.array @ rotation.T, scale_atoms=False)
        other.positions = atoms.positions @ rotation.T + np.array([0.7, -1.3, 2.1])
        moved.append(other)
    rotated = _predict(model, moved)

    reimaged = []  # the same crystal with atoms wrapped into other periodic images
    for atoms in structures:
        other = atoms.copy()
        shifts = np.random.default_rng(2).integers(-1, 2, size=(len(atoms), 3))
        other.positions = atoms.positions + shifts @ atoms.cell.array
        reimaged.append(other)
    wrapped = _predict(model, reimaged)

    for name_ in reference:
        if name_ == "forces":
            rotated_back = rotated["forces"] @ torch.from_numpy(rotation).double()
            torch.testing.assert_close(rotated_back, reference["forces"], rtol=1e-5, atol=1e-6)
        else:
            torch.testing.assert_close(rotated[name_], reference[name_], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(wrapped[name_], reference[name_], rtol=1e-5, atol=1e-6)


def test_every_parameter_gets_a_gradient_when_heads_read_atoms_only() -> None:
    """DDP fails a step in which a parameter got no gradient: formation energy reads atoms, so
    MEGNet's Set2Set readout must still join the graph (as an exact zero)."""
    torch.manual_seed(0)
    model = MatSciModel(
        build_encoder("megnet", CUTOFF, SMALL["megnet"]), [TASKS["mp-formation-energy"]], 8
    ).double()
    model(_batch(_structures()))["mp-formation-energy"]["value"].sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
