"""Radius graphs against ASE's neighbour list, edge for edge, and their collation into PyG."""

from __future__ import annotations

import json
from functools import cache

import ase.io
import numpy as np
import pyarrow as pa
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule
from ase.neighborlist import neighbor_list
from torch_geometric.data import Batch, Data

from matsci_ray.data.record import Record
from matsci_ray.data.schema import records_to_table
from matsci_ray.graphs.batching import RadiusGraphTransform, rows_to_pyg_batch
from matsci_ray.graphs.geometry import edge_vectors
from matsci_ray.graphs.neighbors import _edge_order, radius_graph_pbc
from tests.samples import SAMPLES

CUTOFF = 6.0
OC20 = SAMPLES / "oc20" / "trajectories"
LIPS = SAMPLES / "lips" / "lips_devset.extxyz"
MP = SAMPLES / "materials_project" / "summary_docs.jsonl"

pytestmark = pytest.mark.skipif(not SAMPLES.exists(), reason=f"no sample data at {SAMPLES}")


@cache
def oc20_frames() -> list[Atoms]:
    # First (unrelaxed, symmetric slab) and last frame of a few systems.
    files = sorted(OC20.glob("*.traj"))[:4]
    return [frame for f in files for frame in (ase.io.read(f, 0), ase.io.read(f, -1))]


@cache
def lips_frames() -> list[Atoms]:
    return ase.io.read(LIPS, "0:3")


@cache
def tiny_mp_cells() -> list[Atoms]:
    from pymatgen.core import Structure

    out = []
    for line in MP.read_text().splitlines():
        structure = Structure.from_dict(json.loads(line)["structure"])
        if len(structure) <= 3:
            out.append(
                Atoms(
                    numbers=[site.specie.Z for site in structure],
                    positions=structure.cart_coords,
                    cell=structure.lattice.matrix,
                    pbc=True,
                )
            )
    return out  # 8 in the sample, 2-3 atoms each


def bulk_primitive() -> list[Atoms]:
    # One-atom primitive cells (fcc Cu 11.8 Å^3, bcc Li 21 Å^3): the densest self-image case,
    # since the sample's smallest MP cells still hold 17 Å^3 per atom.
    return [bulk("Cu"), bulk("Li")]


def slab_mixed_pbc() -> Atoms:
    slab = oc20_frames()[-1].copy()
    slab.pbc = [True, True, False]
    return slab


def benzene() -> Atoms:
    mol = molecule("C6H6")  # pbc all False, all-zero cell
    assert not mol.pbc.any() and not mol.cell.any()
    return mol


CASES = {
    "oc20": oc20_frames,
    "oc20-mixed-pbc": lambda: [slab_mixed_pbc()],
    "lips": lips_frames,
    "mp-tiny": tiny_mp_cells,
    "one-atom-cells": bulk_primitive,
    "molecule": lambda: [benzene()],
}


def graph(atoms: Atoms, cutoff: float = CUTOFF, **kw: int) -> tuple[np.ndarray, ...]:
    return radius_graph_pbc(atoms.positions, atoms.cell[:], atoms.pbc, cutoff, **kw)


def edge_set(centre: np.ndarray, neighbour: np.ndarray, shifts: np.ndarray) -> set[tuple]:
    columns = (centre.tolist(), neighbour.tolist(), *np.asarray(shifts).T.tolist())
    return set(zip(*columns, strict=True))


def torch_vectors(atoms: Atoms, edge_index: np.ndarray, offsets: np.ndarray) -> torch.Tensor:
    pos = torch.tensor(atoms.positions)
    return edge_vectors(
        pos,
        torch.tensor(atoms.cell[:])[None],
        torch.from_numpy(edge_index),
        torch.from_numpy(offsets),
        torch.zeros(len(atoms), dtype=torch.long),
    )


@pytest.mark.parametrize("case", list(CASES))
def test_matches_ase_edge_for_edge(case: str) -> None:
    for atoms in CASES[case]():
        edge_index, offsets, dist = graph(atoms)
        i, j, shifts = neighbor_list("ijS", atoms, CUTOFF)
        ours = edge_set(edge_index[1], edge_index[0], offsets)
        assert len(ours) == edge_index.shape[1]  # no duplicates
        assert ours == edge_set(i, j, shifts)
        assert not (offsets[:, ~atoms.pbc] != 0).any()
        vec = torch_vectors(atoms, edge_index, offsets)
        np.testing.assert_allclose(vec.norm(dim=1).numpy(), dist, rtol=0, atol=1e-9)
        assert (dist > 0).all() and (dist < CUTOFF).all()


def test_thin_cells_have_many_self_images() -> None:
    # Cells thinner than 2 x 6 Å: every atom is its own neighbour through periodic images.
    for atoms in [*tiny_mp_cells(), *bulk_primitive()]:
        edge_index, offsets, _ = graph(atoms)
        self_images = edge_index[0] == edge_index[1]
        assert (np.bincount(edge_index[1][self_images], minlength=len(atoms)) >= 2).all()
        assert (np.abs(offsets[self_images]).sum(axis=1) > 0).all()
    copper = bulk_primitive()[0]
    assert graph(copper)[0].shape[1] > 70  # all edges are self-images of the one atom


def test_order_is_deterministic_and_sorted() -> None:
    for atoms in [*oc20_frames()[:2], *tiny_mp_cells()[:2]]:
        edge_index, offsets, dist = graph(atoms)
        again = graph(atoms)
        for a, b in zip((edge_index, offsets, dist), again, strict=True):
            assert np.array_equal(a, b)
        centre, nb = edge_index[1], edge_index[0]
        key = np.lexsort(
            (offsets[:, 2], offsets[:, 1], offsets[:, 0], nb, np.rint(dist * 1e8), centre)
        )
        assert np.array_equal(key, np.arange(len(key)))
        # The packed-key sort equals the plain six-key lexsort on shuffled input.
        perm = np.random.default_rng(0).permutation(len(dist))
        args = (centre[perm], nb[perm], offsets[perm], dist[perm])
        ref = np.lexsort((*args[2].T[::-1], args[1], np.rint(args[3] * 1e8), args[0]))
        assert np.array_equal(_edge_order(*args, len(atoms), CUTOFF), ref)


def test_max_neighbors_keeps_nearest() -> None:
    atoms, k = lips_frames()[0], 12
    full_index, full_offsets, full_dist = graph(atoms)
    edge_index, offsets, dist = graph(atoms, max_neighbors=k)
    centre = edge_index[1]
    assert np.array_equal(np.bincount(centre, minlength=len(atoms)), np.full(len(atoms), k))
    for i in range(len(atoms)):
        mine = full_index[1] == i
        # The full list is sorted, so the k nearest are its first k edges of centre i.
        expected = edge_set(
            full_index[1][mine][:k], full_index[0][mine][:k], full_offsets[mine][:k]
        )
        assert edge_set(centre[centre == i], edge_index[0][centre == i], offsets[centre == i]) == (
            expected
        )
        assert dist[centre == i].max() <= full_dist[mine][k:].min()
    assert graph(atoms, max_neighbors=0)[0].shape == (2, 0)


def test_degenerate_and_empty_input() -> None:
    pos = np.zeros((2, 3))
    with pytest.raises(ValueError, match="cutoff"):
        radius_graph_pbc(pos, np.eye(3), np.ones(3, bool), 0.0)
    with pytest.raises(ValueError, match="positions"):
        radius_graph_pbc(np.zeros((2, 2)), np.eye(3), np.ones(3, bool), 3.0)
    with pytest.raises(ValueError, match="cell"):
        radius_graph_pbc(pos, np.eye(2), np.ones(3, bool), 3.0)
    with pytest.raises(ValueError, match="finite"):
        radius_graph_pbc(np.full((2, 3), np.nan), np.eye(3), np.ones(3, bool), 3.0)
    # vesin itself dies with SIGFPE on these; they must be refused before reaching it.
    for cell in ([[4, 0, 0], [4, 0, 0], [0, 0, 0]], [[4, 0, 0], [0, 0, 0], [0, 0, 3]]):
        with pytest.raises(ValueError, match="degenerate"):
            radius_graph_pbc(pos, np.array(cell, float), np.array([True, True, False]), 3.0)
    edge_index, offsets, dist = radius_graph_pbc(np.zeros((0, 3)), np.zeros((3, 3)), [0, 0, 0], 3)
    assert edge_index.shape == (2, 0) and offsets.shape == (0, 3) and dist.shape == (0,)
    assert radius_graph_pbc(pos[:1], np.zeros((3, 3)), [0, 0, 0], 3.0)[0].shape == (2, 0)


def columnar(frames: list[Atoms], targets: dict[str, list] | None = None) -> pa.Table:
    records = [
        Record(
            "test", str(k), a.numbers, a.positions, a.cell[:], a.pbc,
            {name: values[k] for name, values in (targets or {}).items()},
        )
        for k, a in enumerate(frames)
    ]  # fmt: skip
    return records_to_table(records, "train")


def numpy_batch(table: pa.Table) -> dict[str, np.ndarray]:
    """What ``map_batches(batch_format="numpy")`` hands over, without starting Ray."""
    try:
        from ray.data._internal.arrow_block import ArrowBlockAccessor
    except ImportError:
        return {name: table[name].to_numpy() for name in table.column_names}
    return ArrowBlockAccessor(table).to_batch_format("numpy")


def test_transform_equals_per_row_calls() -> None:
    frames = [*oc20_frames()[:3], *tiny_mp_cells()[:2], benzene()]
    table = columnar(frames)
    nested = numpy_batch(table)
    assert nested["positions"][0].dtype == object  # rows of (3,) arrays, as Ray gives them
    lips = lips_frames()
    stacked = {  # equal-size rows may arrive stacked as one numeric array
        "positions": np.stack([a.positions for a in lips]),
        "cell": np.stack([a.cell[:] for a in lips]),
        "pbc": np.stack([a.pbc for a in lips]),
    }
    transform = RadiusGraphTransform(CUTOFF, max_neighbors=40)
    for batch, rows in ((nested, frames), (stacked, lips), (table, frames)):
        out = transform(batch)
        num_edges = np.asarray(out["num_edges"])
        edges = out["edge_index"] if isinstance(out, dict) else out["edge_index"].to_numpy()
        shifts = out["cell_offsets"] if isinstance(out, dict) else out["cell_offsets"].to_numpy()
        for k, atoms in enumerate(rows):
            edge_index, offsets, _ = graph(atoms, max_neighbors=40)
            assert num_edges[k] == edge_index.shape[1]
            assert np.array_equal(np.asarray(edges[k]), edge_index.reshape(-1))
            assert np.array_equal(np.asarray(shifts[k]), offsets.reshape(-1))
    assert out.column("positions").type == table.column("positions").type


def reference_batch(frames: list[Atoms], energy: list, forces: list, sg: list) -> Batch:
    """The slow, obvious route: one ``Data`` per row, then ``Batch.from_data_list``."""
    data = []
    for atoms, e, f, s in zip(frames, energy, forces, sg, strict=True):
        edge_index, offsets, _ = graph(atoms)
        e_ok, s_ok = e is not None and np.isfinite(e), s is not None
        f_ok = f is not None and bool(np.isfinite(f).all())
        data.append(
            Data(
                z=torch.tensor(atoms.numbers),
                pos=torch.tensor(atoms.positions, dtype=torch.float32),
                cell=torch.tensor(atoms.cell[:], dtype=torch.float32)[None],
                pbc=torch.tensor(atoms.pbc)[None],
                edge_index=torch.from_numpy(edge_index),
                cell_offsets=torch.from_numpy(offsets).float(),
                natoms=torch.tensor([len(atoms)]),
                energy=torch.tensor([e if e_ok else 0.0], dtype=torch.float32),
                energy_mask=torch.tensor([e_ok]),
                forces=torch.tensor(f if f_ok else np.zeros((len(atoms), 3)), dtype=torch.float32),
                forces_mask=torch.tensor([f_ok]),
                space_group=torch.tensor([s - 1 if s_ok else -100]),
                space_group_mask=torch.tensor([s_ok]),
            )
        )
    return Batch.from_data_list(data)


def test_rows_to_pyg_batch_offsets_and_masks() -> None:
    frames = [oc20_frames()[0], tiny_mp_cells()[0], benzene(), lips_frames()[0]]
    rng = np.random.default_rng(1)
    energy = [-3.5, None, float("nan"), 2.0]
    forces = [rng.normal(size=(len(a), 3)) for a in frames]
    forces[1] = None
    forces[3][5, 1] = np.nan  # one NaN component makes the row's forces missing
    sg = [225, 1, None, 230]
    table = columnar(frames, {"energy": energy, "forces": forces, "space_group": sg})
    out = rows_to_pyg_batch(
        numpy_batch(RadiusGraphTransform(CUTOFF)(table)), ["energy", "forces", "space_group"]
    )
    ref = reference_batch(frames, energy, forces, sg)
    assert set(out.keys()) == set(ref.keys())
    for key, want in ref:  # a Data iterates as (key, value) pairs
        assert out[key].dtype == want.dtype, key
        assert torch.equal(out[key], want), key
    natoms = [len(a) for a in frames]
    assert out.ptr.tolist() == np.concatenate([[0], np.cumsum(natoms)]).tolist()
    assert out.num_graphs == 4 and out.energy_mask.tolist() == [True, False, False, True]
    assert out.forces_mask.tolist() == [True, False, True, False]
    assert torch.isfinite(out.forces).all()
    assert out.space_group.tolist() == [224, 0, -100, 229]
    # Edges never cross graphs, and PyG's own per-graph view still works.
    assert torch.equal(out.batch[out.edge_index[0]], out.batch[out.edge_index[1]])
    for got, want in zip(out.to_data_list(), ref.to_data_list(), strict=True):
        assert torch.equal(got.edge_index, want.edge_index)
    with pytest.raises(ValueError, match="RadiusGraphTransform"):
        rows_to_pyg_batch(numpy_batch(table), ["energy"])


def test_edge_length_gradient_matches_finite_differences() -> None:
    # A multi-atom cell (a one-atom cell's edge lengths cannot depend on its position).
    atoms = next(a for a in tiny_mp_cells() if len(a) > 1)
    edge_index, offsets, _ = graph(atoms, cutoff=4.0)
    ei, sh = torch.from_numpy(edge_index), torch.from_numpy(offsets)
    cell, batch = torch.tensor(atoms.cell[:])[None], torch.zeros(len(atoms), dtype=torch.long)

    def energy(pos: torch.Tensor) -> torch.Tensor:
        return edge_vectors(pos, cell, ei, sh, batch).norm(dim=1).sum()

    jitter = np.random.default_rng(2).normal(scale=0.05, size=atoms.positions.shape)
    pos = torch.tensor(atoms.positions + jitter, requires_grad=True)
    (grad,) = torch.autograd.grad(energy(pos), pos)
    numeric = torch.zeros_like(grad)
    eps = 1e-6
    with torch.no_grad():
        for a in range(len(atoms)):
            for c in range(3):
                step = torch.zeros_like(pos)
                step[a, c] = eps
                numeric[a, c] = (energy(pos + step) - energy(pos - step)) / (2 * eps)
    assert grad.abs().max() > 1e-3  # not trivially zero
    torch.testing.assert_close(grad, numeric, rtol=1e-5, atol=1e-6)
