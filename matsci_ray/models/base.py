"""The interface every encoder implements.

An encoder maps a PyG ``Batch`` of periodic graphs to invariant per-atom and per-structure
features. It knows nothing about targets: heads and tasks are built elsewhere and read only
``node_dim`` / ``graph_dim``, so any encoder can be paired with any task.

Batch fields an encoder may read (see ``matsci_ray.graphs``): ``z`` (N,) long atomic numbers,
``pos`` (N, 3) float positions in Å (may require grad: forces are ``-dE/dpos``), ``cell``
(B, 3, 3) rows are lattice vectors, ``edge_index`` (2, E) with ``[0]`` the neighbour ``j`` and
``[1]`` the centre ``i``, ``cell_offsets`` (E, 3), ``batch`` (N,) and ``num_graphs``.
Edge vectors must be computed inside ``forward`` from ``pos`` with
``matsci_ray.graphs.geometry.edge_vectors`` so that autograd reaches the positions.
"""

from __future__ import annotations

import abc
from typing import Any, NamedTuple

from torch import Tensor, nn


class EncoderOutput(NamedTuple):
    """Invariant features: ``node`` is ``(N, node_dim)``, ``graph`` is ``(B, graph_dim)``."""

    node: Tensor
    graph: Tensor


class Encoder(nn.Module, metaclass=abc.ABCMeta):
    """Abstract base of all encoders.

    Subclasses set ``node_dim``, ``graph_dim`` and ``cutoff`` (Å; the radius the neighbour list
    must at least cover, and where the model's smooth envelope reaches zero) in ``__init__``.
    Every operation must support double backward, because force training differentiates a
    loss on ``-dE/dpos`` again with respect to the weights.
    """

    node_dim: int
    graph_dim: int
    cutoff: float
    # the atomic numbers an encoder with a fixed element table was built for (MACE's one-hot):
    # prediction refuses a structure holding any other; None: every element it embeds
    elements: tuple[int, ...] | None = None

    @abc.abstractmethod
    def forward(self, batch: Any) -> EncoderOutput:
        """Encode a PyG ``Batch``; outputs are invariant to rotation, translation and image."""

    @abc.abstractmethod
    def reset_parameters(self) -> None:
        """Re-initialise all learnable parameters (deterministic under ``torch.manual_seed``)."""

    def num_parameters(self) -> int:
        """Number of trainable scalars, for reports and size checks."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
