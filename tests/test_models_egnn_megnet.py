"""EGNN and MEGNet encoders: shapes, symmetries, forces, double backward, size, training."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator

import pytest
import torch
from torch_geometric.data import Batch, Data
from torch_geometric.utils import scatter

from matsci_ray.models.base import Encoder
from matsci_ray.models.egnn import EGNN
from matsci_ray.models.megnet import MEGNet

CUTOFF = 4.0

# Small configurations keep the float64 finite-difference checks fast.
SMALL: dict[str, Callable[[], Encoder]] = {
    "egnn": lambda: EGNN(hidden_dim=32, num_layers=2, mlp_dim=32, num_rbf=16, cutoff=CUTOFF),
    "egnn_coords": lambda: EGNN(
        hidden_dim=32, num_layers=3, mlp_dim=32, num_rbf=16, cutoff=CUTOFF, update_coords=True
    ),
    "megnet": lambda: MEGNet(dim=16, num_blocks=2, num_rbf=20, cutoff=CUTOFF),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Graphs here are tiny; intra-op threading only adds overhead (and stalls on busy CI)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def periodic_graph(n_atoms: int, gen: torch.Generator, radius: float = CUTOFF) -> Data:
    """Random atoms in a random cell; edges by brute force over all images within ``radius``."""
    cell = torch.diag(3.0 + 2.0 * torch.rand(3, generator=gen, dtype=torch.float64))
    cell = cell + 0.6 * (torch.rand(3, 3, generator=gen, dtype=torch.float64) - 0.5)
    pos = torch.rand(n_atoms, 3, generator=gen, dtype=torch.float64) @ cell
    z = torch.randint(1, 90, (n_atoms,), generator=gen)
    volume = torch.linalg.det(cell).abs()
    heights = [
        volume / torch.linalg.cross(cell[(k + 1) % 3], cell[(k + 2) % 3]).norm() for k in range(3)
    ]
    reps = [math.ceil(radius / h) + 1 for h in heights]
    offsets = torch.tensor(
        list(itertools.product(*(range(-r, r + 1) for r in reps))), dtype=torch.float64
    )
    # vec[s, i, j] = pos[j] - pos[i] + S_s @ cell: centre i to neighbour j's image s.
    vec = pos[None, None, :, :] - pos[None, :, None, :] + (offsets @ cell)[:, None, None, :]
    dist = vec.norm(dim=-1)
    s, i, j = ((dist < radius) & (dist > 1e-8)).nonzero(as_tuple=True)
    return Data(
        z=z,
        pos=pos,
        cell=cell.unsqueeze(0),
        edge_index=torch.stack([j, i]),
        cell_offsets=offsets[s],
        num_nodes=n_atoms,
    )


def make_batch(seed: int = 0, radius: float = CUTOFF, sizes: tuple[int, ...] = (3, 5)) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    return Batch.from_data_list([periodic_graph(n, gen, radius) for n in sizes])


def _float32(batch: Batch) -> Batch:
    batch.pos, batch.cell, batch.cell_offsets = (
        batch.pos.float(),
        batch.cell.float(),
        batch.cell_offsets.float(),
    )
    return batch


def small_model(name: str) -> Encoder:
    torch.manual_seed(0)
    return SMALL[name]().double()


def outputs(model: Encoder, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(batch)
    return out.node, out.graph


def energy(
    model: Encoder, batch: Batch, w_node: torch.Tensor, w_graph: torch.Tensor
) -> torch.Tensor:
    """Per-structure energy from both outputs, so every parameter has a path to it."""
    out = model(batch)
    per_atom = scatter(out.node @ w_node, batch.batch, 0, dim_size=batch.num_graphs, reduce="sum")
    return per_atom + out.graph @ w_graph


def heads(model: Encoder) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    w_node = torch.randn(model.node_dim, generator=gen, dtype=torch.float64) / model.node_dim
    w_graph = torch.randn(model.graph_dim, generator=gen, dtype=torch.float64) / model.graph_dim
    return w_node, w_graph


@pytest.mark.parametrize("name", list(SMALL))
def test_output_shapes(name: str) -> None:
    torch.manual_seed(0)
    model = SMALL[name]()
    batch = _float32(make_batch())
    node, graph = outputs(model, batch)
    assert node.shape == (batch.num_nodes, model.node_dim)
    assert graph.shape == (batch.num_graphs, model.graph_dim)
    assert node.dtype == graph.dtype == torch.float32
    assert torch.isfinite(node).all() and torch.isfinite(graph).all()


def _rotated(batch: Batch, seed: int) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
    if torch.linalg.det(q) < 0:  # a proper rotation
        q[:, 0] = -q[:, 0]
    out = batch.clone()
    out.pos, out.cell = batch.pos @ q.T, batch.cell @ q.T  # rows are vectors: rotate both
    return out


def _translated(batch: Batch, seed: int) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    out = batch.clone()
    out.pos = batch.pos + 10.0 * torch.randn(3, generator=gen, dtype=torch.float64)
    return out


def _rewrapped(batch: Batch, seed: int) -> Batch:
    """Move every atom by a random lattice vector of its cell and fix the edge offsets."""
    gen = torch.Generator().manual_seed(seed)
    n = torch.randint(-2, 3, (batch.num_nodes, 3), generator=gen).to(torch.float64)
    src, dst = batch.edge_index
    out = batch.clone()
    out.pos = batch.pos + torch.einsum("nj,njk->nk", n, batch.cell[batch.batch])
    out.cell_offsets = batch.cell_offsets - n[src] + n[dst]
    return out


@pytest.mark.parametrize("name", list(SMALL))
@pytest.mark.parametrize("transform", [_rotated, _translated, _rewrapped])
def test_invariance(name: str, transform: Callable[[Batch, int], Batch]) -> None:
    model = small_model(name)
    batch = make_batch()
    node, graph = outputs(model, batch)
    node_t, graph_t = outputs(model, transform(batch, 7))
    torch.testing.assert_close(node_t, node)
    torch.testing.assert_close(graph_t, graph)


@pytest.mark.parametrize("name", list(SMALL))
def test_larger_neighbour_list_changes_nothing(name: str) -> None:
    """Edges beyond the model's cutoff carry zero weight, so a skin in the list is harmless."""
    model = small_model(name)
    node, graph = outputs(model, make_batch(radius=CUTOFF))
    node_wide, graph_wide = outputs(model, make_batch(radius=CUTOFF + 1.5))
    torch.testing.assert_close(node_wide, node)
    torch.testing.assert_close(graph_wide, graph)


@pytest.mark.parametrize("name", list(SMALL))
def test_forces_match_finite_differences(name: str) -> None:
    model = small_model(name)
    batch = make_batch()
    w_node, w_graph = heads(model)
    batch.pos = batch.pos.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(energy(model, batch, w_node, w_graph).sum(), batch.pos)
    forces = -grad
    step = 1e-5
    with torch.no_grad():
        for atom, axis in [(0, 0), (1, 2), (4, 1), (7, 0), (7, 2)]:
            shifted = []
            for sign in (1.0, -1.0):
                moved = batch.clone()
                moved.pos = batch.pos.detach().clone()
                moved.pos[atom, axis] += sign * step
                shifted.append(energy(model, moved, w_node, w_graph).sum())
            fd = -(shifted[0] - shifted[1]) / (2 * step)
            torch.testing.assert_close(forces[atom, axis], fd, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", list(SMALL))
def test_double_backward_reaches_every_parameter(name: str) -> None:
    model = small_model(name)
    batch = make_batch()
    w_node, w_graph = heads(model)
    batch.pos = batch.pos.clone().requires_grad_(True)
    e = energy(model, batch, w_node, w_graph)
    (grad,) = torch.autograd.grad(e.sum(), batch.pos, create_graph=True)
    force_loss = grad.pow(2).mean()
    force_only = torch.autograd.grad(
        force_loss, list(model.parameters()), allow_unused=True, retain_graph=True
    )
    assert any(g is not None and g.abs().sum() > 0 for g in force_only)
    (e.pow(2).mean() + force_loss).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} gets no gradient"
        assert torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize(
    ("factory", "low", "high"),
    [
        (EGNN, 0.6e6, 0.8e6),
        (lambda: EGNN(update_coords=True), 0.6e6, 0.8e6),
        (MEGNet, 1.2e6, 1.45e6),
    ],
)
def test_default_parameter_counts(factory: Callable[[], Encoder], low: float, high: float) -> None:
    model = factory()
    assert low <= model.num_parameters() <= high
    node, graph = outputs(model, _float32(make_batch(sizes=(2,))))
    assert node.shape[-1] == model.node_dim and graph.shape[-1] == model.graph_dim


@pytest.mark.parametrize("name", list(SMALL))
def test_reset_parameters_is_seeded(name: str) -> None:
    model = SMALL[name]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)
    model.reset_parameters()
    first = {k: v.clone() for k, v in model.state_dict().items()}
    assert any(not torch.equal(first[k], before[k]) for k in first)
    torch.manual_seed(123)
    model.reset_parameters()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, first[k], rtol=0, atol=0)


@pytest.mark.parametrize("name", list(SMALL))
def test_training_lowers_loss(name: str) -> None:
    torch.manual_seed(0)
    model = SMALL[name]()
    batch = _float32(make_batch(sizes=(3, 4, 5, 6)))
    head = torch.nn.Linear(model.graph_dim, 1)
    target = torch.tensor([1.0, -2.0, 0.5, 3.0])
    params = [*model.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=3e-3)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = (head(model(batch).graph).squeeze(-1) - target).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_egnn_factorised_edge_linear_is_the_paper_concatenation() -> None:
    """The per-node split of the first edge Linear gives phi_e([h_i, h_j, d2, rbf]) exactly."""
    from matsci_ray.models.egnn import EGNNLayer

    gen = torch.Generator().manual_seed(3)
    layer = EGNNLayer(8, 16, 5, update_coords=False, attention=False, aggr_norm=1.0).double()
    h = torch.randn(6, 8, generator=gen, dtype=torch.float64)
    src = torch.randint(0, 6, (20,), generator=gen)
    dst = torch.randint(0, 6, (20,), generator=gen)
    d2 = torch.rand(20, generator=gen, dtype=torch.float64)
    rbf = torch.rand(20, 5, generator=gen, dtype=torch.float64)
    direct = layer.edge_mlp[0](torch.cat([h[dst], h[src], d2.unsqueeze(-1), rbf], dim=-1))
    torch.testing.assert_close(layer._first_edge_linear(h, d2, rbf, src, dst), direct)
