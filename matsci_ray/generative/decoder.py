"""CDVAE's noise-conditioned score network: on a noisy crystal (atom types, positions, cell)
and the latent ``z``, it predicts per atom the displacement back towards the data (an
equivariant vector) and the true atom type (logits).

CDVAE used GemNet-dT here; this one is built from the project's own EGNN layers
(:class:`~matsci_ray.models.egnn.EGNNLayer`, invariant messages on edge lengths) with an
equivariant vector read-out: a learned weight per edge times the edge's unit vector, summed
over the neighbours. The noise level enters as ``log sigma`` beside ``z`` in each atom's input
(GemNet-dT in CDVAE saw only ``z``; a small network denoises better when told the scale).

With ``sigma_ref`` given, the read-out is multiplied by ``sigma_ref / sigma``: the target is
``(true - noisy) / sigma``, while a displaced atom's edge vectors move by the displacement
itself (Å), so the gain from geometry to target grows as ``1 / sigma``, which per-edge
weights computed from ``log sigma`` otherwise have to learn over three decades of noise;
``sigma_ref``, the levels' geometric mean, keeps mid-range levels at unit scale. Whether it
helps depends on the data (``CDVAE``'s ``decoder_gain``). The read-out starts at zero, so
training starts from a zero score's loss.

The periodic radius graph of the noisy structure is rebuilt on every call, by vesin through
:func:`~matsci_ray.graphs.neighbors.radius_graph_pbc`, on the CPU: positions are inputs here,
never differentiated.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn
from torch_geometric.utils import scatter

from matsci_ray.graphs.geometry import edge_vectors
from matsci_ray.graphs.neighbors import radius_graph_pbc
from matsci_ray.models.blocks import AtomEmbedding, CosineCutoff, GaussianRBF, mlp, reset_children
from matsci_ray.models.egnn import EGNNLayer

NUM_TYPES = 100  # CDVAE's element vocabulary: atomic numbers 1..100 (class k is Z = k + 1)
NUM_RBF = 32
AGGR_NORM = 16.0  # about the neighbours each atom keeps (max_neighbors 20): a stable scale


def periodic_graph(
    pos: Tensor, cell: Tensor, batch: Tensor, cutoff: float, max_neighbors: int
) -> tuple[Tensor, Tensor]:
    """``edge_index`` and ``cell_offsets`` of every structure of a batch, offsets per graph,
    as :class:`~matsci_ray.graphs.batching.RadiusGraphTransform` lays them out."""
    counts = torch.bincount(batch, minlength=cell.shape[0]).tolist()
    positions = pos.detach().cpu().double().numpy()
    cells = cell.detach().cpu().double().numpy()
    pbc = np.ones(3, dtype=bool)
    edges, shifts, start = [], [], 0
    for row, n in enumerate(counts):
        index, offsets, _ = radius_graph_pbc(
            positions[start : start + n], cells[row], pbc, cutoff, max_neighbors
        )
        edges.append(index + start)
        shifts.append(offsets)
        start += n
    edge_index = torch.from_numpy(np.concatenate(edges, axis=1)).to(pos.device)
    cell_offsets = torch.from_numpy(np.concatenate(shifts)).to(pos.device, pos.dtype)
    return edge_index, cell_offsets


class ScoreDecoder(nn.Module):
    """``(coordinate output (N, 3), type logits (N, NUM_TYPES))`` of a noisy batch.

    Args:
        hidden_dim, num_layers: width and depth of the EGNN layers.
        latent_dim: size of the latent ``z`` each atom is given.
        cutoff, max_neighbors: the radius graph rebuilt on each noisy crystal.
        sigma_ref: Å, the read-out gain's reference (the gain is ``sigma_ref / sigma``);
            ``None``: no gain.
    """

    def __init__(
        self,
        hidden_dim: int,
        num_layers: int,
        latent_dim: int,
        cutoff: float,
        max_neighbors: int,
        sigma_ref: float | None,
    ) -> None:
        super().__init__()
        # a buffer: saved with the weights, so a checkpoint without it fails to load
        log_ref = None if sigma_ref is None else torch.tensor(math.log(sigma_ref))
        self.register_buffer("log_sigma_ref", log_ref)
        self.cutoff = float(cutoff)
        self.max_neighbors = max_neighbors
        self.embedding = AtomEmbedding(hidden_dim)
        self.inputs = mlp([hidden_dim + latent_dim + 1, hidden_dim, hidden_dim])
        self.rbf = GaussianRBF(NUM_RBF, stop=cutoff)
        self.envelope = CosineCutoff(cutoff)
        self.layers = nn.ModuleList(
            EGNNLayer(hidden_dim, hidden_dim, NUM_RBF, False, True, AGGR_NORM)
            for _ in range(num_layers)
        )
        self.edge_weight = mlp([2 * hidden_dim + NUM_RBF, hidden_dim, 1])
        self.type_head = mlp([hidden_dim, hidden_dim, NUM_TYPES])
        self._zero_read_out()

    def reset_parameters(self) -> None:
        reset_children(self)
        self._zero_read_out()

    def _zero_read_out(self) -> None:
        """Start from a zero coordinate output (the loss of a zero score at every level):
        random weights times the gain (up to ``sigma_ref / sigma_end``) would start the
        smallest levels' loss far above it."""
        last = self.edge_weight[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(
        self,
        z_atoms: Tensor,
        types: Tensor,
        pos: Tensor,
        cell: Tensor,
        batch: Tensor,
        log_sigma: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """``z_atoms`` (N, latent) each atom's structure's latent, ``types`` (N,) atomic
        numbers, ``log_sigma`` (N,) the coordinate noise level of each atom's structure."""
        edge_index, offsets = periodic_graph(pos, cell, batch, self.cutoff, self.max_neighbors)
        vec = edge_vectors(pos, cell, edge_index, offsets, batch)
        dist = vec.norm(dim=-1).clamp_min(1e-6)
        rbf, env = self.rbf(dist), self.envelope(dist)
        h = self.inputs(torch.cat([self.embedding(types), z_atoms, log_sigma.unsqueeze(-1)], -1))
        d2 = (dist / self.cutoff).pow(2)
        for layer in self.layers:
            h, vec = layer(h, vec, d2, rbf, env, edge_index)
        src, dst = edge_index[0], edge_index[1]
        weight = self.edge_weight(torch.cat([h[dst], h[src], rbf], dim=-1)) * env.unsqueeze(-1)
        # an equivariant sum of unit edge vectors (i -> image of j), weighted invariantly
        coords = scatter(weight * vec / dist.unsqueeze(-1), dst, 0, dim_size=h.shape[0])
        if self.log_sigma_ref is not None:
            coords = coords * (self.log_sigma_ref - log_sigma).exp().unsqueeze(-1)
        return coords, self.type_head(h)
