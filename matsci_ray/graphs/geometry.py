"""Edge geometry from positions, so that autograd reaches the positions (forces).

Edge convention, used by every model: ``edge_index[0]`` is the neighbour ``j`` (message source),
``edge_index[1]`` the centre ``i`` (message target, PyG's ``source_to_target`` flow). The graph
stores integer ``cell_offsets`` ``S`` per edge; the edge vector from ``i`` to the periodic image
of ``j`` is ``pos[j] - pos[i] + S @ cell``. Lists are full (both directions present).
"""

from __future__ import annotations

import torch


def edge_vectors(
    pos: torch.Tensor,
    cell: torch.Tensor,
    edge_index: torch.Tensor,
    cell_offsets: torch.Tensor,
    batch: torch.Tensor,
) -> torch.Tensor:
    """``(E, 3)`` vectors from each centre to its neighbour's image, in Å.

    ``cell`` is ``(B, 3, 3)`` (rows are lattice vectors), ``batch`` maps atoms to graphs.
    """
    src, dst = edge_index[0], edge_index[1]
    shift = torch.einsum("ej,ejk->ek", cell_offsets.to(pos.dtype), cell[batch[dst]])
    return pos[src] - pos[dst] + shift
