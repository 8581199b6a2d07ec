"""E(n)-equivariant graph neural network for periodic structures.

Satorras, Hoogeboom and Welling, "E(n) Equivariant Graph Neural Networks", ICML 2021
(arXiv:2102.09844). One layer (their Eqs. 3-6, with ``i`` the centre, ``j`` a neighbour)::

    m_ij  = phi_e(h_i, h_j, |r_ij|^2, rbf(|r_ij|)) * gate(m_ij) * envelope(|r_ij|)
    x_i  <- x_i + (1/Z) sum_j (x_i - x_j) phi_x(m_ij)              (optional)
    h_i  <- h_i + phi_h(h_i, (1/Z) sum_j m_ij)

Materials changes: a Gaussian expansion of the distance joins ``|r|^2`` (common in periodic
variants), a cosine envelope makes edges fade out at the cutoff (smooth forces), and the sum
is divided by a constant ``Z`` instead of the neighbour count: a per-node mean would jump when
an edge crosses the cutoff even though its message is zero there. Coordinate updates act on
the edge vectors (``r_ij <- r_ij + dx_j - dx_i``), never on raw position differences, so the
periodic image each edge points to is kept. The paper leaves coordinates fixed for invariant
property prediction (QM9), so updates are off by default.

Default size (hidden 128, 3 layers, MLP width 256, 50 Gaussians): 646,915 parameters
(713,477 with ``update_coords=True``).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch_geometric.utils import scatter

from matsci_ray.models.base import Encoder, EncoderOutput
from matsci_ray.models.blocks import (
    AtomEmbedding,
    CosineCutoff,
    GaussianRBF,
    edge_geometry,
    graph_index,
    mlp,
    readout,
    readout_width,
    reset_children,
)


class EGNNLayer(nn.Module):
    """One E(n)-equivariant message-passing layer on invariant ``h`` and edge vectors."""

    def __init__(
        self,
        hidden_dim: int,
        mlp_dim: int,
        num_rbf: int,
        update_coords: bool,
        attention: bool,
        aggr_norm: float,
    ) -> None:
        super().__init__()
        self.aggr_norm = aggr_norm
        self.edge_mlp = mlp([2 * hidden_dim + 1 + num_rbf, mlp_dim, hidden_dim], activate_last=True)
        # The paper's soft edge inference: a learned per-edge weight in (0, 1).
        self.gate = nn.Linear(hidden_dim, 1) if attention else None
        self.node_mlp = mlp([2 * hidden_dim, mlp_dim, hidden_dim])
        self.coord_mlp = mlp([hidden_dim, mlp_dim, 1]) if update_coords else None

    def forward(
        self,
        h: Tensor,
        vec: Tensor,
        d2: Tensor,
        rbf: Tensor,
        env: Tensor,
        edge_index: Tensor,
    ) -> tuple[Tensor, Tensor]:
        src, dst = edge_index[0], edge_index[1]
        m = self.edge_mlp[1:](self._first_edge_linear(h, d2, rbf, src, dst))
        if self.gate is not None:
            m = m * torch.sigmoid(self.gate(m))
        m = m * env.unsqueeze(-1)
        agg = scatter(m, dst, 0, dim_size=h.shape[0], reduce="sum") / self.aggr_norm
        h = h + self.node_mlp(torch.cat([h, agg], dim=-1))
        if self.coord_mlp is not None:
            # tanh bounds each step (the paper notes raw updates can diverge); the envelope
            # factor keeps the update smooth at the cutoff. x_i - x_j is -vec in our convention.
            w = torch.tanh(self.coord_mlp(m)) * env.unsqueeze(-1)
            dx = scatter(-vec * w, dst, 0, dim_size=h.shape[0], reduce="sum") / self.aggr_norm
            vec = vec + dx[src] - dx[dst]
        return h, vec

    def _first_edge_linear(
        self, h: Tensor, d2: Tensor, rbf: Tensor, src: Tensor, dst: Tensor
    ) -> Tensor:
        """``Linear([h_dst, h_src, d2, rbf])`` with the node blocks of the weight applied per
        node, then gathered: the same numbers with ~E/N fewer multiplications (1.75x faster
        EGNN steps on MP batches)."""
        first: nn.Linear = self.edge_mlp[0]  # type: ignore[assignment]
        width = h.shape[1]
        w_dst, w_src, w_edge = first.weight.split([width, width, first.in_features - 2 * width], 1)
        edge = torch.cat([d2.unsqueeze(-1), rbf], dim=-1)
        return (
            (h @ w_dst.T)[dst] + (h @ w_src.T)[src] + nn.functional.linear(edge, w_edge, first.bias)
        )


class EGNN(Encoder):
    """EGNN encoder: invariant atom features and sum/mean-pooled structure features.

    Args:
        hidden_dim: width of the atom features (``node_dim``).
        num_layers: message-passing layers.
        mlp_dim: hidden width inside each layer's MLPs.
        num_rbf: Gaussians expanding the edge length on ``[0, cutoff]``.
        cutoff: Å; the envelope reaches zero here (the neighbour list must reach at least this).
        update_coords: also update (equivariant) coordinates between layers.
        attention: gate each message with a learned sigmoid weight.
        aggr_norm: constant that divides neighbour sums (about the typical envelope-weighted
            neighbour count, so features keep a stable scale).
        readout: ``"sum_mean"``, ``"sum"`` or ``"mean"``.
        element_features: embed atoms from periodic-table descriptors plus a learned
            per-element correction (:class:`~matsci_ray.models.blocks.AtomEmbedding`).
    """

    def __init__(
        self,
        *,
        hidden_dim: int = 128,
        num_layers: int = 3,
        mlp_dim: int = 256,
        num_rbf: int = 50,
        cutoff: float = 6.0,
        update_coords: bool = False,
        attention: bool = True,
        aggr_norm: float = 16.0,
        readout: Literal["sum_mean", "sum", "mean"] = "sum_mean",
        element_features: bool = False,
    ) -> None:
        super().__init__()
        self.node_dim = hidden_dim
        self.graph_dim = readout_width(hidden_dim, readout)
        self.cutoff = float(cutoff)
        self.readout = readout
        self.embedding = AtomEmbedding(hidden_dim, element_features=element_features)
        self.rbf = GaussianRBF(num_rbf, stop=cutoff)
        self.envelope = CosineCutoff(cutoff)
        # The last layer's coordinate update would feed nothing: leaving it out avoids
        # parameters without gradients (which DistributedDataParallel rejects).
        self.layers = nn.ModuleList(
            EGNNLayer(
                hidden_dim,
                mlp_dim,
                num_rbf,
                update_coords and k < num_layers - 1,
                attention,
                aggr_norm,
            )
            for k in range(num_layers)
        )

    def reset_parameters(self) -> None:
        reset_children(self)

    def forward(self, batch: Any) -> EncoderOutput:
        index, num_graphs = graph_index(batch)
        vec, dist = edge_geometry(batch, index)
        # The envelope stays on the input geometry: it decides how strongly each listed edge
        # exists, while the messages see the (possibly updated) current distances.
        env = self.envelope(dist)
        h = self.embedding(batch.z)
        for layer in self.layers:
            h, vec = layer(
                h, vec, (dist / self.cutoff).pow(2), self.rbf(dist), env, batch.edge_index
            )
            if layer.coord_mlp is not None:
                dist = vec.pow(2).sum(-1).clamp_min(1e-12).sqrt()
        return EncoderOutput(node=h, graph=readout(h, index, num_graphs, self.readout))
