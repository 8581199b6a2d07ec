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
    with torch.autocast(pos.device.type, enabled=False):  # fp32 under bf16: forces derive from it
        shift = torch.einsum("ej,ejk->ek", cell_offsets.to(pos.dtype), cell[batch[dst]])
    return pos[src] - pos[dst] + shift


# Voigt component k of a 3×3 tensor is entry (_VOIGT_ROWS[k], _VOIGT_COLS[k]): xx yy zz yz xz xy.
_VOIGT_ROWS = (0, 1, 2, 1, 0, 0)
_VOIGT_COLS = (0, 1, 2, 2, 2, 1)


def apply_strain(
    pos: torch.Tensor, cell: torch.Tensor, batch: torch.Tensor, displacement: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions and cell deformed by ``I + ε``, ``ε`` the symmetric part of ``displacement``
    (B, 3, 3), one per structure.

    Straining the cell strains every periodic image too (edge vectors add ``S @ cell``), so
    every edge vector becomes ``v (I + ε)``: with ``displacement`` zero the geometry is
    unchanged and ``∂E/∂displacement`` is the virial ``∂E/∂ε``.
    """
    strain = 0.5 * (displacement + displacement.transpose(1, 2))
    pos = pos + torch.einsum("ni,nij->nj", pos, strain[batch])
    cell = cell + torch.bmm(cell, strain)
    return pos, cell


def voigt(tensor: torch.Tensor) -> torch.Tensor:
    """``(B, 6)`` Voigt components (xx, yy, zz, yz, xz, xy) of symmetric ``(B, 3, 3)`` tensors."""
    return tensor[:, _VOIGT_ROWS, _VOIGT_COLS]
