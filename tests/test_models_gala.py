"""GALA beyond the encoder contract (``test_encoder_contract.py``): readout widths, atoms
without neighbours or pairs, neighbour pairs, collinear neighbours under double backward,
gradgradcheck, the default size, and smoothness at both cutoffs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor
from torch_geometric.data import Batch, Data

from matsci_ray.models.gala import GALA, neighbour_pairs

CUTOFF = 3.5
PAIR_CUTOFF = 2.5


def small_model(**kwargs: object) -> GALA:
    config: dict = dict(
        dim=32,
        heads=4,
        num_layers=2,
        ffn_dim=48,
        num_rbf=8,
        num_angular=6,
        cutoff=CUTOFF,
        pair_cutoff=PAIR_CUTOFF,
    )
    config.update(kwargs)
    torch.manual_seed(0)
    return GALA(**config)


def neighbour_list(pos: Tensor, cell: Tensor, cutoff: float) -> tuple[Tensor, Tensor]:
    """Brute force over periodic images: ``edge_index`` ([0] neighbour, [1] centre), offsets."""
    # Lattice planes k are 1/|column k of cell^-1| apart; +1 covers atoms anywhere in the cell.
    reps = (torch.ceil(cutoff * torch.linalg.inv(cell).norm(dim=0)) + 1).long().tolist()
    shifts = torch.cartesian_prod(*(torch.arange(-r, r + 1) for r in reps)).to(pos.dtype)
    disp = pos[None, :, None, :] + (shifts @ cell)[None, None] - pos[:, None, None, :]
    dist = disp.norm(dim=-1)  # (centre i, neighbour j, image s)
    i, j, s = torch.nonzero((dist < cutoff) & (dist > 1e-8), as_tuple=True)
    return torch.stack([j, i]), shifts[s]


def make_graph(z: Tensor, pos: Tensor, cell: Tensor, cutoff: float = CUTOFF) -> Data:
    edge_index, offsets = neighbour_list(pos, cell, cutoff)
    return Data(z=z, pos=pos, cell=cell.unsqueeze(0), edge_index=edge_index, cell_offsets=offsets)


def random_structure(seed: int, num_atoms: int = 5, dtype: torch.dtype = torch.float64) -> Data:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.rand(3, generator=gen) * 1.5 + 4.0
    cell = (torch.diag(lengths) + 0.4 * torch.randn(3, 3, generator=gen)).to(dtype)
    for _ in range(100):  # reject overlapping atoms: they make distances unrealistically short
        pos = torch.rand(num_atoms, 3, generator=gen).to(dtype) @ cell
        if neighbour_list(pos, cell, 1.2)[0].shape[1] == 0:
            break
    z = torch.randint(1, 30, (num_atoms,), generator=gen)
    return make_graph(z, pos, cell)


def random_batch(seeds: tuple[int, ...] = (1, 2, 3), dtype: torch.dtype = torch.float64) -> Batch:
    return Batch.from_data_list([random_structure(s, 4 + s % 3, dtype) for s in seeds])


def energy(model: GALA, batch: Batch) -> Tensor:
    """A fixed scalar readout standing in for a task head."""
    out = model(batch)
    w = torch.linspace(-1.0, 1.0, model.graph_dim, dtype=out.graph.dtype)
    return out.graph @ w


@pytest.mark.parametrize(("mode", "width"), [("sum_mean", 64), ("sum", 32), ("mean", 32)])
def test_shapes(mode: str, width: int) -> None:
    model = small_model(readout=mode).double()
    batch = random_batch()
    out = model(batch)
    assert out.node.shape == (batch.num_nodes, 32)
    assert out.graph.shape == (3, width) and model.graph_dim == width
    assert torch.isfinite(out.graph).all()


def test_isolated_atom_and_no_pairs() -> None:
    # Self tokens keep the softmax defined when an atom has no neighbours at all.
    box = 20 * torch.eye(3, dtype=torch.float64)
    lone = make_graph(torch.tensor([6]), torch.zeros(1, 3, dtype=torch.float64), box)
    batch = Batch.from_data_list([lone, random_structure(4)])
    for pair_cutoff in (0.0, PAIR_CUTOFF):
        out = small_model(pair_cutoff=pair_cutoff).double()(batch)
        assert torch.isfinite(out.graph).all()


def test_neighbour_pairs_are_unordered_and_complete() -> None:
    dist = torch.tensor([1.0, 3.0, 1.5, 0.5, 2.0, 1.2])
    centre = torch.tensor([0, 0, 1, 0, 1, 2])
    first, second = neighbour_pairs(dist, centre, pair_cutoff=2.5)
    got = {tuple(sorted(p)) for p in zip(first.tolist(), second.tolist(), strict=True)}
    assert got == {(0, 3), (2, 4)} and len(first) == 2


def test_double_backward_with_collinear_neighbours() -> None:
    # Simple cubic: every atom has collinear neighbour pairs (|a^b| = 0), a bad spot for sqrt.
    cubic = make_graph(torch.tensor([26]), torch.zeros(1, 3), 2.2 * torch.eye(3))
    batch = Batch.from_data_list([cubic, random_structure(6, dtype=torch.float32)])
    model = small_model()
    batch.pos.requires_grad_(True)
    e = energy(model, batch)
    (grad,) = torch.autograd.grad(e.sum(), batch.pos, create_graph=True)
    assert torch.isfinite(grad).all()
    assert grad[0].abs().max() < 1e-5  # cubic symmetry: no force on the lone atom
    (grad.pow(2).sum() + e.pow(2).sum()).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(bool(g.abs().sum() > 0) for g in grads) >= 0.9 * len(grads)


def test_gradgradcheck_positions() -> None:
    model = small_model(dim=8, heads=2, num_layers=1, ffn_dim=8).double()
    batch = random_batch((8,))

    def fn(pos: Tensor) -> Tensor:
        batch.pos = pos
        return energy(model, batch)

    pos = batch.pos.clone().requires_grad_(True)
    assert torch.autograd.gradgradcheck(fn, (pos,), atol=1e-5, rtol=1e-4)


def test_default_parameter_count_and_forward() -> None:
    model = GALA()
    assert model.cutoff == 6.0 and model.node_dim == 192 and model.graph_dim == 384
    assert abs(model.num_parameters() - 2_000_000) < 0.05 * 2_000_000
    batch = random_batch((1, 2), dtype=torch.float32)
    out = model(batch)
    assert out.graph.shape == (2, 384)
    before = [p.detach().clone() for p in model.parameters()]
    torch.manual_seed(1)
    model.reset_parameters()
    changed = [not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)]
    assert sum(changed) > 0.5 * len(changed)


def _energy_with_mover(model: GALA, distance: float) -> float:
    """Energy of a cluster in a big cell with one atom at ``distance`` from atom 0."""
    direction = torch.tensor([-1.0, -2.0, -2.0], dtype=torch.float64) / 3.0
    pos = torch.tensor(
        [[10.0, 10.0, 10.0], [10.0, 11.6, 10.0], [8.8, 10.2, 10.9]], dtype=torch.float64
    )
    pos = torch.cat([pos, (pos[0] + distance * direction).unsqueeze(0)])
    graph = make_graph(torch.tensor([8, 1, 1, 14]), pos, 20.0 * torch.eye(3).double(), model.cutoff)
    with torch.no_grad():
        return energy(model, Batch.from_data_list([graph])).item()


# At the cutoff the mover meets only atom 0, so E(rc - d) - E(rc + d) is O(d^2) (the envelope's
# slope vanishes too: continuous forces). At the pair cutoff the edge stays and varies
# linearly, so only O(d) is expected there. A hard cutoff would leave a jump of O(1).
@pytest.mark.parametrize(("radius", "ratio"), [(CUTOFF, 1e-3), (PAIR_CUTOFF, 0.05)])
def test_energy_continuous_at_cutoffs(radius: float, ratio: float) -> None:
    """Crossing the cutoff (the edge appears) or the pair cutoff (pairs appear) is smooth."""
    model = small_model().double()

    def jump(delta: float) -> float:
        outside = _energy_with_mover(model, radius + delta)
        return abs(outside - _energy_with_mover(model, radius - delta))

    coarse, fine = jump(1e-2), jump(1e-4)
    assert coarse > 1e-12  # the mover does influence the energy near the cutoff
    assert math.isfinite(fine) and fine < ratio * coarse
