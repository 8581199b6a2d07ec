"""The contract every registered encoder keeps, tested for each one at its small setting.

A model is tested here by being registered (``matsci_ray.models.registry``): shapes and dtypes
of its outputs, invariance to rotation, translation and periodic images, forces through
``matsci_ray.potential`` equal to finite differences of its energy, atom order, batching,
a wider neighbour list, double backward for force training, seeded ``reset_parameters``, and
a few optimiser steps that lower a loss. Structures are tiny crystals built by the project's
own neighbour list and collation; model-specific behaviour stays in ``test_models_*.py``,
which reuses the ``check_*`` helpers here for other settings of one encoder.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from scipy.spatial.transform import Rotation
from torch import Tensor

from matsci_ray.graphs.batching import RadiusGraphTransform, rows_to_pyg_batch
from matsci_ray.inference import atoms_to_columns
from matsci_ray.models import build_encoder, model_names, model_spec
from matsci_ray.models.base import Encoder
from matsci_ray.potential import MatSciModel
from matsci_ray.tasks.registry import TASKS
from tests.devices import CUDA, DEVICES

pytestmark = pytest.mark.usefixtures("one_thread")

CUTOFF = 4.0
NAMES = model_names()
# a head of every kind: an energy with forces (atoms' energies summed), an energy per atom
# (averaged), and structure-level regression, binary and multiclass targets (graph readout)
ENERGY, GRAPH_TASK = "lips-forces", "mp-band-gap"
HEADS = [ENERGY, "mp-formation-energy", GRAPH_TASK, "mp-stability", "mp-space-group"]
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}  # positions pass through float32 in collation


def small_encoder(name: str) -> Encoder:
    """Encoder ``name`` at its registered small setting, seeded."""
    torch.manual_seed(0)
    return build_encoder(name, CUTOFF, model_spec(name).small_params())


def crystals() -> list[Atoms]:
    """Three tiny periodic structures, rattled off symmetry so that forces do not vanish."""
    triclinic = Atoms(
        "MgSiO",
        scaled_positions=[[0.0, 0.0, 0.0], [0.5, 0.45, 0.1], [0.2, 0.7, 0.6]],
        cell=[[4.2, 0.0, 0.0], [0.6, 3.9, 0.0], [0.3, -0.4, 4.5]],
        pbc=True,
    )
    structures = [
        bulk("Si", "diamond", a=5.43),
        bulk("NaCl", "rocksalt", a=5.64, cubic=True),
        triclinic,
    ]
    rng = np.random.default_rng(0)
    for atoms in structures:
        atoms.positions += rng.normal(scale=0.1, size=atoms.positions.shape)
    return structures


def to_batch(structures: list[Atoms], radius: float = CUTOFF, double: bool = True) -> object:
    """A PyG batch as training builds it: the project's neighbour list and collation."""
    batch = rows_to_pyg_batch(RadiusGraphTransform(radius)(atoms_to_columns(structures)), [])
    if double:
        batch.pos, batch.cell = batch.pos.double(), batch.cell.double()
        batch.cell_offsets = batch.cell_offsets.double()
    return batch


def with_heads(encoder: Encoder) -> MatSciModel:
    """The encoder in float64 under a head of every kind, with non-trivial normalisers (as
    after ``fit_normalisation``)."""
    torch.manual_seed(1)
    model = MatSciModel(encoder, [TASKS[t] for t in HEADS], head_hidden=16).double()
    for head in model.heads.values():
        for buffer_name, buffer in head.named_buffers():
            if buffer_name != "mean":
                buffer.copy_(torch.rand_like(buffer) + 0.5)
    return model.eval()


def predict(
    model: MatSciModel, structures: list[Atoms], radius: float = CUTOFF, device: str = "cpu"
) -> dict:
    """Encoder outputs, every head's value and the forces, detached, on the CPU (``model``
    lives on ``device``)."""
    batch = to_batch(structures, radius).to(device)
    preds = model(batch, forces=True)
    out = model.encoder(batch)
    values = {name: p["value"].detach().cpu() for name, p in preds.items()}
    forces = preds[ENERGY]["forces"].detach().cpu()
    node, graph = out.node.detach().cpu(), out.graph.detach().cpu()
    return {"node": node, "graph": graph, "forces": forces, **values}


def assert_same(got: dict, want: dict, skip: tuple[str, ...] = ()) -> None:
    for key in want:
        if key not in skip:
            torch.testing.assert_close(got[key], want[key], **TOLERANCE, msg=key)


def moved(structures: list[Atoms], how: str) -> list[Atoms]:
    """The same crystals rotated and translated, or with atoms wrapped into other images."""
    rotation = Rotation.random(random_state=1).as_matrix()
    rng = np.random.default_rng(2)
    out = []
    for atoms in structures:
        other = atoms.copy()
        if how == "rotated":
            other.set_cell(atoms.cell.array @ rotation.T, scale_atoms=False)
            other.positions = atoms.positions @ rotation.T + np.array([0.7, -1.3, 2.1])
        else:
            shifts = rng.integers(-2, 3, size=(len(atoms), 3))
            other.positions = atoms.positions + shifts @ atoms.cell.array
        out.append(other)
    return out


# --- checks, reused by test_models_*.py for other settings of one encoder ---------------------


def check_invariance(encoder: Encoder, device: str = "cpu") -> None:
    model = with_heads(encoder).to(device)
    structures = crystals()
    reference = predict(model, structures, device=device)
    imaged = predict(model, moved(structures, "imaged"), device=device)
    assert_same(imaged, reference)
    rotated = predict(model, moved(structures, "rotated"), device=device)
    assert_same(rotated, reference, skip=("forces",))
    rotation = torch.from_numpy(Rotation.random(random_state=1).as_matrix())
    torch.testing.assert_close(rotated["forces"] @ rotation, reference["forces"], **TOLERANCE)


def check_forces_match_finite_differences(encoder: Encoder, device: str = "cpu") -> None:
    model = with_heads(encoder).to(device)
    batch = to_batch(crystals()).to(device)
    forces = model(batch, forces=True)[ENERGY]["forces"].detach()
    # at initialisation some encoders' energies barely depend on positions: compare against
    # the largest force, with a step whose rounding error stays far below it
    largest = forces.abs().max().item()
    assert largest > 1e-9
    step = 1e-4
    for atom, axis in [(0, 0), (1, 2), (4, 1), (9, 0), (12, 2)]:
        energies = []
        for sign in (1.0, -1.0):
            displaced = batch.clone()
            displaced.pos = batch.pos.detach().clone()
            displaced.pos[atom, axis] += sign * step
            with torch.no_grad():
                energies.append(model(displaced, forces=False)[ENERGY]["value"].sum())
        numeric = -(energies[0] - energies[1]) / (2 * step)
        torch.testing.assert_close(
            forces[atom, axis].cpu(), numeric.cpu(), rtol=1e-4, atol=1e-4 * largest
        )


# --- the contract, per registered encoder ------------------------------------------------------


def test_every_registered_model_is_tested() -> None:
    assert {"egnn", "megnet", "gala", "mace"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_outputs_have_the_declared_shapes_and_dtype(name: str) -> None:
    encoder = small_encoder(name)
    batch = to_batch(crystals(), double=False)
    out = encoder(batch)
    assert out.node.shape == (batch.num_nodes, encoder.node_dim)
    assert out.graph.shape == (batch.num_graphs, encoder.graph_dim)
    assert out.node.dtype == out.graph.dtype == torch.float32
    assert torch.isfinite(out.node).all() and torch.isfinite(out.graph).all()
    assert encoder.cutoff == CUTOFF


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", NAMES)
def test_invariant_to_rotation_translation_and_periodic_image(name: str, device: str) -> None:
    check_invariance(small_encoder(name), device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", NAMES)
def test_forces_are_minus_the_energy_gradient(name: str, device: str) -> None:
    check_forces_match_finite_differences(small_encoder(name), device)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("device", [CUDA])
def test_the_gpu_computes_what_the_cpu_does(name: str, device: str) -> None:
    """The same weights in float64 on the GPU and the CPU: every output and the forces agree to
    the rounding of another summation order (scatter-adds on a GPU add in any order), and no
    part of the encoder stayed behind on the CPU (it would fail with mixed devices)."""
    model = with_heads(small_encoder(name))
    structures = crystals()
    on_cpu = predict(model, structures)
    on_gpu = predict(model.to(device), structures, device=device)
    for key, want in on_cpu.items():
        torch.testing.assert_close(on_gpu[key], want, rtol=1e-9, atol=1e-11, msg=key)


@pytest.mark.parametrize("name", NAMES)
def test_atom_order_permutes_atom_outputs_only(name: str) -> None:
    model = with_heads(small_encoder(name))
    structures = crystals()
    order = [np.random.default_rng(3).permutation(len(a)) for a in structures]
    reference = predict(model, structures)
    permuted = predict(model, [a[o] for a, o in zip(structures, order, strict=True)])
    starts = np.cumsum([0] + [len(a) for a in structures[:-1]])
    index = torch.from_numpy(np.concatenate([s + o for s, o in zip(starts, order, strict=True)]))
    per_atom = ("node", "forces")
    assert_same(permuted, reference, skip=per_atom)
    for key in per_atom:
        torch.testing.assert_close(permuted[key], reference[key][index], **TOLERANCE, msg=key)


@pytest.mark.parametrize("name", NAMES)
def test_a_batch_of_two_equals_each_alone(name: str) -> None:
    model = with_heads(small_encoder(name))
    first, second = crystals()[1:]
    together = predict(model, [first, second])
    alone = [predict(model, [first]), predict(model, [second])]
    assert_same(together, {k: torch.cat([a[k] for a in alone]) for k in together})


@pytest.mark.parametrize("name", NAMES)
def test_a_wider_neighbour_list_changes_nothing(name: str) -> None:
    """Edges beyond the model's cutoff carry zero weight, so a skin in the list is harmless."""
    model = with_heads(small_encoder(name))
    structures = crystals()
    assert_same(predict(model, structures, CUTOFF + 1.5), predict(model, structures))


@pytest.mark.parametrize("name", NAMES)
def test_double_backward_reaches_every_parameter(name: str) -> None:
    """Force training differentiates the forces again, with respect to every weight (DDP
    refuses a step in which a parameter got no gradient)."""
    model = with_heads(small_encoder(name)).train()
    preds = model(to_batch(crystals()), forces=True)
    force_loss = preds[ENERGY]["forces"].pow(2).mean()
    params = list(model.encoder.parameters())
    force_only = torch.autograd.grad(force_loss, params, allow_unused=True, retain_graph=True)
    assert any(g is not None and g.abs().sum() > 0 for g in force_only)
    (
        force_loss + preds[ENERGY]["value"].pow(2).mean() + preds[GRAPH_TASK]["value"].sum()
    ).backward()
    for pname, p in model.encoder.named_parameters():
        assert p.grad is not None, f"{pname} gets no gradient"
        assert torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name", NAMES)
def test_every_parameter_gets_a_gradient_when_heads_read_atoms_only(name: str) -> None:
    """With only atom-reading heads (formation energy) a structure readout's weights (MEGNet's
    Set2Set) must still join the graph, as an exact zero, or DDP fails the step."""
    torch.manual_seed(0)
    model = MatSciModel(small_encoder(name), [TASKS["mp-formation-energy"]], 8).double()
    model(to_batch(crystals()))["mp-formation-energy"]["value"].sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize("name", NAMES)
def test_reset_parameters_is_seeded(name: str) -> None:
    encoder = small_encoder(name)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    torch.manual_seed(123)
    encoder.reset_parameters()
    first = {k: v.clone() for k, v in encoder.state_dict().items()}
    assert any(not torch.equal(first[k], before[k]) for k in first)
    torch.manual_seed(123)
    encoder.reset_parameters()
    for k, v in encoder.state_dict().items():
        torch.testing.assert_close(v, first[k], rtol=0, atol=0)


def carbons() -> list[Atoms]:
    """Four 2-atom diamond cells of one element, differently strained and rattled: only
    geometry tells their atoms apart."""
    rng = np.random.default_rng(1)
    structures = [bulk("C", "diamond", a=a) for a in (3.50, 3.57, 3.65, 3.75)]
    for atoms in structures:
        atoms.positions += rng.normal(0.0, 0.05, atoms.positions.shape)
    return structures


@pytest.mark.parametrize("name", NAMES)
def test_atoms_of_one_element_are_told_apart_by_geometry(name: str) -> None:
    """At initialisation, atoms of one element in different environments get features that
    differ by more than 1e-5 of their size (every encoder here: 2e-4 or more). MEGNet under
    torch's default initialisation gave 1e-6: its stacked layers had shrunk what geometry adds
    to nothing, and on carbon-24 it could not fit even its training structures."""
    with torch.no_grad():
        node = small_encoder(name)(to_batch(carbons(), double=False)).node
    spread, size = node.std(dim=0).mean(), node.abs().mean()
    assert spread > 1e-5 * size, (spread.item(), size.item())


@pytest.mark.parametrize("name", NAMES)
def test_a_few_steps_lower_a_loss(name: str) -> None:
    encoder = small_encoder(name)
    batch = to_batch(crystals(), double=False)
    head = torch.nn.Linear(encoder.graph_dim, 1)
    target = torch.tensor([1.0, -2.0, 0.5])
    opt = torch.optim.Adam([*encoder.parameters(), *head.parameters()], lr=3e-3)
    losses: list[float] = []
    for _ in range(25):
        opt.zero_grad()
        loss: Tensor = (head(encoder(batch).graph).squeeze(-1) - target).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
