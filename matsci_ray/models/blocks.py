"""Small building blocks shared by the encoders.

Everything here is built from plain tensor ops (no torch-scatter, no cuDNN RNNs) so that it
supports double backward on every device: force training differentiates ``-dE/dpos`` again.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch_geometric.utils import scatter

from matsci_ray.graphs.geometry import edge_vectors
from matsci_ray.models import elements

MAX_Z = 118


class ShiftedSoftplus(nn.Module):
    """``softplus(x) - log 2``: zero at the origin, the activation of SchNet and MEGNet."""

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.softplus(x) - math.log(2.0)


def mlp(
    dims: Sequence[int],
    act: type[nn.Module] = nn.SiLU,
    activate_last: bool = False,
) -> nn.Sequential:
    """Linear layers ``dims[0] -> dims[1] -> ... -> dims[-1]`` with ``act`` in between."""
    if len(dims) < 2:
        raise ValueError(f"an MLP needs at least input and output sizes, got {list(dims)}")
    layers: list[nn.Module] = []
    for k, (d_in, d_out) in enumerate(itertools.pairwise(dims)):
        layers.append(nn.Linear(d_in, d_out))
        if activate_last or k < len(dims) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def reset_children(module: nn.Module) -> None:
    """Call ``reset_parameters`` on every descendant that has one (not on ``module`` itself)."""
    for child in module.modules():
        if child is not module and hasattr(child, "reset_parameters"):
            child.reset_parameters()


class GaussianRBF(nn.Module):
    """Gaussian expansion ``exp(-((d - mu_k) / width)^2)`` with centres evenly on [start, stop].

    ``width`` defaults to the centre spacing, which keeps neighbouring Gaussians overlapping.
    """

    def __init__(
        self, num: int = 50, stop: float = 6.0, start: float = 0.0, width: float | None = None
    ) -> None:
        super().__init__()
        centres = torch.linspace(start, stop, num)
        spacing = (stop - start) / max(num - 1, 1)
        self.num = num
        self.width = float(width) if width is not None else spacing
        self.register_buffer("centres", centres)

    def forward(self, dist: Tensor) -> Tensor:
        diff = (dist.unsqueeze(-1) - self.centres) / self.width
        return torch.exp(-diff.pow(2))


class CosineCutoff(nn.Module):
    """Envelope ``0.5 (cos(pi d / cutoff) + 1)`` inside the cutoff, 0 outside.

    Its value and slope vanish at the cutoff, so edges entering or leaving the neighbour list
    change the energy and forces continuously.
    """

    def __init__(self, cutoff: float) -> None:
        super().__init__()
        self.cutoff = float(cutoff)

    def forward(self, dist: Tensor) -> Tensor:
        env = 0.5 * (torch.cos(dist * (math.pi / self.cutoff)) + 1.0)
        return env * (dist < self.cutoff).to(dist.dtype)


class AtomEmbedding(nn.Module):
    """Learned vector per atomic number ``1..MAX_Z`` (row 0 unused).

    With ``element_features`` the vector is a linear map of the element's descriptors
    (:mod:`matsci_ray.models.elements`) plus a per-Z correction that starts at zero, so an
    element never seen in training is embedded by its chemistry, not by a random draw.
    """

    def __init__(self, dim: int, max_z: int = MAX_Z, element_features: bool = False) -> None:
        super().__init__()
        self.embedding = nn.Embedding(max_z + 1, dim)
        self.features: nn.Linear | None = None
        if element_features:
            table = elements.element_features(max_z)
            self.register_buffer("descriptors", table)  # saved: checkpoints stand alone
            self.features = nn.Linear(table.shape[1], dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.embedding.reset_parameters()
        if self.features is not None:
            self.features.reset_parameters()
            nn.init.zeros_(self.embedding.weight)

    def forward(self, z: Tensor) -> Tensor:
        if self.features is None:
            return self.embedding(z)
        return self.features(self.descriptors[z]) + self.embedding(z)


def graph_index(batch: Any) -> tuple[Tensor, int]:
    """Atom-to-structure index and number of structures; tolerates a bare ``Data``."""
    index = getattr(batch, "batch", None)
    if index is None:
        return torch.zeros(batch.z.shape[0], dtype=torch.long, device=batch.z.device), 1
    return index, int(batch.num_graphs)


def edge_geometry(batch: Any, index: Tensor) -> tuple[Tensor, Tensor]:
    """``(E, 3)`` centre-to-neighbour vectors and ``(E,)`` lengths, differentiable in ``pos``."""
    vec = edge_vectors(batch.pos, batch.cell, batch.edge_index, batch.cell_offsets, index)
    # The clamp keeps sqrt's gradient finite should a degenerate zero-length edge slip in.
    dist = vec.pow(2).sum(-1).clamp_min(1e-12).sqrt()
    return vec, dist


def readout(x: Tensor, index: Tensor, num_graphs: int, mode: str = "sum_mean") -> Tensor:
    """Pool node features per structure: ``sum``, ``mean`` or both concatenated (``sum_mean``)."""
    if mode == "sum_mean":
        return torch.cat(
            [
                scatter(x, index, 0, dim_size=num_graphs, reduce="sum"),
                scatter(x, index, 0, dim_size=num_graphs, reduce="mean"),
            ],
            dim=-1,
        )
    if mode in ("sum", "mean"):
        return scatter(x, index, 0, dim_size=num_graphs, reduce=mode)
    raise ValueError(f"unknown readout {mode!r}; use 'sum', 'mean' or 'sum_mean'")


def readout_width(dim: int, mode: str) -> int:
    """Width of :func:`readout`'s output for ``dim``-wide inputs."""
    return 2 * dim if mode == "sum_mean" else dim


class Set2Set(nn.Module):
    """Set2Set pooling (Vinyals, Bengio, Kudlur, ICLR 2016) with an optional per-item weight.

    Written out instead of ``torch_geometric.nn.aggr.Set2Set`` because that one runs
    ``nn.LSTM``, whose cuDNN kernel has no double backward (force training on GPU fails).
    The LSTM cell here is two linear maps. A ``weight`` in [0, 1] multiplies each item's
    attention before normalisation, i.e. adds ``log(weight)`` to its logit; passing the cutoff
    envelope makes edges fade out of the pooled vector smoothly at the cutoff.
    Output is ``(num_groups, 2 * dim)``.
    """

    def __init__(self, dim: int, steps: int = 3) -> None:
        super().__init__()
        self.dim = dim
        self.steps = steps
        self.input_map = nn.Linear(2 * dim, 4 * dim)
        self.hidden_map = nn.Linear(dim, 4 * dim, bias=False)

    def reset_parameters(self) -> None:
        self.input_map.reset_parameters()
        self.hidden_map.reset_parameters()

    def forward(
        self, x: Tensor, index: Tensor, dim_size: int, weight: Tensor | None = None
    ) -> Tensor:
        h = x.new_zeros(dim_size, self.dim)
        c = x.new_zeros(dim_size, self.dim)
        q_star = x.new_zeros(dim_size, 2 * self.dim)
        for _ in range(self.steps):
            gates = self.input_map(q_star) + self.hidden_map(h)
            i, f, g, o = gates.chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            logits = (x * h[index]).sum(-1)
            # Subtracting the per-group max only stabilises exp; detaching it is exact.
            top = scatter(logits.detach(), index, 0, dim_size=dim_size, reduce="max")
            att = torch.exp(logits - top[index])
            if weight is not None:
                att = att * weight
            norm = scatter(att, index, 0, dim_size=dim_size, reduce="sum")
            att = att / (norm[index] + 1e-12)
            r = scatter(att.unsqueeze(-1) * x, index, 0, dim_size=dim_size, reduce="sum")
            q_star = torch.cat([h, r], dim=-1)
        return q_star
