"""GALA: geometric algebra attention over each atom's periodic neighbourhood.

Spellings, "Geometric Algebra Attention Networks for Small Point Clouds" (arXiv:2110.02393,
2021; reference code: the ``geometric_algebra_attention`` package). GALA attends over *tuples*
of a point's neighbours: each tuple's vectors are multiplied with the geometric product, the
rotation-invariant parts of that product are joined with the neighbours' (and the centre's
own) features, and a value MLP and a score MLP turn the result into values and attention
logits; a softmax over the tuples weights the values. Here, with ``a = r_ij`` and ``b = r_ik``
edge vectors from centre ``i`` (from ``edge_vectors``, so autograd reaches positions):

* rank 0, the centre itself: ``t_i = act(W h_i)``;
* rank 1, every edge ``j -> i`` (the paper's vector-invariant layer), invariant ``|a|`` in a
  Gaussian basis, joined with ``h_j`` and merged with ``h_i``:
  ``t_ij = act(W_r rbf(|a|) + W_n h_j + W_c h_i)``;
* rank 2, unordered pairs of edges inside ``pair_cutoff``: the product ``ab = a.b + a^b`` has
  invariants ``a.b`` (scalar part) and ``|a^b|^2`` (bivector part, ``= |a x b|^2``), plus
  ``cos(angle)`` in a Gaussian basis; joined symmetrically with the rank-1 tokens:
  ``t_ijk = act(W_s (t_ij + t_ik) + W_p (t_ij * t_ik) + W_g invariants(ab))``.

All tokens of a centre share one multi-head softmax; values and scores come from shared MLPs.
Each block is pre-LayerNorm: ``h += out(attention(LN h))`` then ``h += FFN(LN h)``.

Design choices beyond the paper (which treats small, non-periodic clouds):

* Smooth cutoff: a token's softmax term is multiplied by its cosine envelope (``fc(|a|)``, or
  ``fc'(|a|) fc'(|b|)`` with ``fc'`` on ``pair_cutoff``), i.e. ``w_t exp(s_t) / sum w exp(s)``.
  Terms fade out at the cutoff, so energies and forces are continuous; the always-present
  self token keeps the denominator positive for isolated atoms. This is written out rather
  than ``torch_geometric.utils.softmax(s + log w)`` because ``log w`` has an infinite slope at
  ``w = 0`` and gives NaN gradients there.
* Pairs use a smooth inner cutoff instead of the k nearest neighbours: a k-nearest set swaps
  members when two neighbours exchange rank, which makes the energy jump. Cost stays linear in
  the number of atoms at fixed density.
* ``|a^b|`` is used squared: its square root has no derivative for collinear neighbours,
  which are common in crystals. Third-order (trivector) tuples are left out: in 3-D they cost
  ``O(k^3)`` per atom, and the pseudoscalar's magnitude is a function of the pair invariants
  of the three vectors anyway.

Default size (dim 192, 8 heads, 4 blocks, FFN 432, 32 radial and 16 angular Gaussians,
cutoff 6 Å, pair cutoff 4 Å): 1,992,224 parameters.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

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


class Neighbourhood(NamedTuple):
    """Geometry shared by all blocks: tokens are ``[self (N), edges (E), pairs (P)]``."""

    edge_index: Tensor  # (2, E)
    radial: Tensor  # (E, num_rbf) Gaussian basis of |r_ij|
    pair_first: Tensor  # (P,) edge ids of each pair's two edges
    pair_second: Tensor
    angular: Tensor  # (P, num_angular + 2) invariants of the geometric product
    token_centre: Tensor  # (N + E + P,) centre atom of every token
    token_weight: Tensor  # (N + E + P,) envelope multiplying each token's softmax term


def neighbour_pairs(dist: Tensor, centre: Tensor, pair_cutoff: float) -> tuple[Tensor, Tensor]:
    """Unordered pairs of distinct edges with a common centre, both shorter than the cutoff.

    Edges are sorted by centre; within a centre's segment each edge is paired with every later
    one. Built without gradients: membership is discrete, smoothness comes from the envelope.
    """
    with torch.no_grad():
        inner = torch.nonzero(dist < pair_cutoff).squeeze(1)
        ctr = centre[inner]
        order = torch.argsort(ctr, stable=True)
        inner, ctr = inner[order], ctr[order]
        seg_end = torch.cumsum(torch.bincount(ctr), 0)[ctr]  # exclusive end of own segment
        slot = torch.arange(inner.numel(), device=dist.device)
        count = seg_end - slot - 1  # partners after this edge in its segment
        first = slot.repeat_interleave(count)
        start = (torch.cumsum(count, 0) - count).repeat_interleave(count)
        second = first + 1 + torch.arange(first.numel(), device=dist.device) - start
        return inner[first], inner[second]


def envelope_softmax(logits: Tensor, weight: Tensor, index: Tensor, size: int) -> Tensor:
    """``w_t exp(s_t) / sum_{t' in group} w_t' exp(s_t')`` per group and head.

    ``logits`` is ``(T, H)``, ``weight`` ``(T,)`` in [0, 1]. The shift by the group maximum of
    ``s + log w`` only prevents overflow (the ratio does not depend on it), so it is computed
    without gradients; it makes the largest term exactly 1, so the denominator is >= 1.
    """
    with torch.no_grad():
        shifted = logits + torch.log(weight.clamp_min(1e-30)).unsqueeze(-1)
        top = scatter(shifted, index, 0, dim_size=size, reduce="max")
    att = torch.exp(logits - top[index]) * weight.unsqueeze(-1)
    norm = scatter(att, index, 0, dim_size=size, reduce="sum")
    return att / norm[index]


class GALABlock(nn.Module):
    """Multi-head attention over self, edge and edge-pair tokens, then a feed-forward net."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, num_rbf: int, num_ang: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.act = nn.SiLU()
        self.norm_attn = nn.LayerNorm(dim)
        self.norm_ffn = nn.LayerNorm(dim)
        self.self_in = nn.Linear(dim, dim)
        self.edge_radial = nn.Linear(num_rbf, dim)
        self.edge_nbr = nn.Linear(dim, dim, bias=False)
        self.edge_ctr = nn.Linear(dim, dim, bias=False)
        self.pair_sum = nn.Linear(dim, dim)
        self.pair_prod = nn.Linear(dim, dim, bias=False)
        self.pair_geo = nn.Linear(num_ang + 2, dim, bias=False)
        self.value = mlp([dim, dim, dim])
        self.score = mlp([dim, dim // 2, heads])
        self.out = nn.Linear(dim, dim)
        self.ffn = mlp([dim, ffn_dim, dim])

    def attend(self, x: Tensor, geo: Neighbourhood) -> Tensor:
        n = x.shape[0]
        src, dst = geo.edge_index[0], geo.edge_index[1]
        t_self = self.act(self.self_in(x))
        # Project atoms before gathering: N x dim work instead of E x dim.
        t_edge = self.act(
            self.edge_radial(geo.radial) + self.edge_nbr(x)[src] + self.edge_ctr(x)[dst]
        )
        t1, t2 = t_edge[geo.pair_first], t_edge[geo.pair_second]
        # Sum and product of the two edge tokens: symmetric in the pair (GALA's mean join),
        # and the product lets the pair term depend on both neighbours jointly.
        t_pair = self.act(
            self.pair_sum(t1 + t2) + self.pair_prod(t1 * t2) + self.pair_geo(geo.angular)
        )
        tokens = torch.cat([t_self, t_edge, t_pair])
        att = envelope_softmax(self.score(tokens), geo.token_weight, geo.token_centre, n)
        values = self.value(tokens).unflatten(-1, (self.heads, -1))
        merged = scatter(att.unsqueeze(-1) * values, geo.token_centre, 0, dim_size=n, reduce="sum")
        return self.out(merged.flatten(1))

    def forward(self, h: Tensor, geo: Neighbourhood) -> Tensor:
        h = h + self.attend(self.norm_attn(h), geo)
        return h + self.ffn(self.norm_ffn(h))


class GALA(Encoder):
    """Geometric algebra attention encoder: invariant atom and pooled structure features.

    Args:
        dim: width of atom features and tokens (``node_dim``).
        heads: attention heads (``dim`` must be divisible by it).
        num_layers: attention blocks.
        ffn_dim: hidden width of each block's feed-forward net.
        num_rbf: Gaussians expanding edge lengths on ``[0, cutoff]``.
        num_angular: Gaussians expanding the pair angle's cosine on ``[-1, 1]``.
        cutoff: Å; rank-1 envelope reaches zero here (neighbour lists must reach this far).
        pair_cutoff: Å; edges shorter than this form rank-2 pairs (0 disables pairs).
        readout: ``"sum_mean"``, ``"sum"`` or ``"mean"``.
        element_features: embed atoms from periodic-table descriptors plus a learned
            per-element correction (:class:`~matsci_ray.models.blocks.AtomEmbedding`).
    """

    def __init__(
        self,
        *,
        dim: int = 192,
        heads: int = 8,
        num_layers: int = 4,
        ffn_dim: int = 432,
        num_rbf: int = 32,
        num_angular: int = 16,
        cutoff: float = 6.0,
        pair_cutoff: float = 4.0,
        readout: Literal["sum_mean", "sum", "mean"] = "sum_mean",
        element_features: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= pair_cutoff <= cutoff:
            raise ValueError(f"pair_cutoff {pair_cutoff} must lie in [0, cutoff={cutoff}]")
        self.node_dim = dim
        self.graph_dim = readout_width(dim, readout)
        self.cutoff = float(cutoff)
        self.pair_cutoff = float(pair_cutoff)
        self.readout = readout
        self.embedding = AtomEmbedding(dim, element_features=element_features)
        self.radial = GaussianRBF(num_rbf, stop=cutoff)
        self.angular = GaussianRBF(num_angular, start=-1.0, stop=1.0)
        self.envelope = CosineCutoff(cutoff)
        self.pair_envelope = CosineCutoff(max(pair_cutoff, 1e-6))
        self.layers = nn.ModuleList(
            GALABlock(dim, heads, ffn_dim, num_rbf, num_angular) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(dim)

    def reset_parameters(self) -> None:
        reset_children(self)

    def neighbourhood(self, batch: Any, index: Tensor) -> Neighbourhood:
        """Invariants of single edge vectors and of pairwise geometric products."""
        vec, dist = edge_geometry(batch, index)
        dst = batch.edge_index[1]
        num_atoms = batch.z.shape[0]
        first, second = neighbour_pairs(dist, dst, self.pair_cutoff)
        a, b = vec[first], vec[second]
        da, db = dist[first], dist[second]
        dot = (a * b).sum(-1)
        bivector2 = torch.linalg.cross(a, b).pow(2).sum(-1)
        scale = self.pair_cutoff**2  # makes the raw invariants O(1)
        angular = torch.cat(
            [
                self.angular(dot / (da * db)),
                (dot / scale).unsqueeze(-1),
                (bivector2 / scale**2).unsqueeze(-1),
            ],
            dim=-1,
        )
        pair_weight = self.pair_envelope(da) * self.pair_envelope(db)
        return Neighbourhood(
            edge_index=batch.edge_index,
            radial=self.radial(dist),
            pair_first=first,
            pair_second=second,
            angular=angular,
            token_centre=torch.cat([torch.arange(num_atoms, device=dst.device), dst, dst[first]]),
            token_weight=torch.cat([dist.new_ones(num_atoms), self.envelope(dist), pair_weight]),
        )

    def forward(self, batch: Any) -> EncoderOutput:
        index, num_graphs = graph_index(batch)
        geo = self.neighbourhood(batch, index)
        h = self.embedding(batch.z)
        for layer in self.layers:
            h = layer(h, geo)
        h = self.norm(h)
        return EncoderOutput(node=h, graph=readout(h, index, num_graphs, self.readout))
