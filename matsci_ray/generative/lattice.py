"""Cells as CDVAE describes them: six lattice parameters (three lengths in Å, three angles in
degrees), fractional coordinates and periodic minimum-image displacements.

Everything is batched torch: ``(B, 6)`` parameters, ``(B, 3, 3)`` matrices whose rows are the
lattice vectors (the project's ``cell`` convention), ``(N, 3)`` coordinates with ``batch``
mapping atoms to structures. Matrices built from parameters follow pymatgen's
``Lattice.from_parameters`` orientation (``c`` along z), so a structure and its re-built cell
differ by a rotation only.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Angles a predicted cell is clamped to: outside them the cell is close to flat, and the
# neighbour search refuses it. CDVAE's data sets have none outside 30..150 degrees.
MIN_ANGLE, MAX_ANGLE = 30.0, 150.0
MIN_LENGTH = 1.0  # Å: a shorter predicted length is raised to it


def matrix_to_params(cell: Tensor) -> Tensor:
    """``(B, 6)`` ``a, b, c`` (Å) and ``alpha, beta, gamma`` (degrees) of ``(B, 3, 3)`` cells."""
    lengths = cell.norm(dim=-1)
    a, b, c = cell[:, 0], cell[:, 1], cell[:, 2]

    def angle(u: Tensor, v: Tensor, nu: Tensor, nv: Tensor) -> Tensor:
        cosine = ((u * v).sum(-1) / (nu * nv)).clamp(-1.0, 1.0)
        return torch.rad2deg(torch.arccos(cosine))

    alpha = angle(b, c, lengths[:, 1], lengths[:, 2])
    beta = angle(a, c, lengths[:, 0], lengths[:, 2])
    gamma = angle(a, b, lengths[:, 0], lengths[:, 1])
    return torch.cat([lengths, torch.stack([alpha, beta, gamma], dim=-1)], dim=-1)


def params_to_matrix(params: Tensor) -> Tensor:
    """``(B, 3, 3)`` cells of ``(B, 6)`` lattice parameters, lengths and angles clamped to a
    cell the neighbour search accepts (:data:`MIN_LENGTH`, :data:`MIN_ANGLE`..:data:`MAX_ANGLE`)."""
    lengths = params[:, :3].clamp_min(MIN_LENGTH)
    angles = torch.deg2rad(params[:, 3:].clamp(MIN_ANGLE, MAX_ANGLE))
    cos, sin = torch.cos(angles), torch.sin(angles)
    # gamma* (the reciprocal angle) places b in the xy-plane once c lies along z
    cos_gamma_star = (cos[:, 0] * cos[:, 1] - cos[:, 2]) / (sin[:, 0] * sin[:, 1])
    cos_gamma_star = cos_gamma_star.clamp(-1.0, 1.0)
    sin_gamma_star = torch.sqrt((1.0 - cos_gamma_star**2).clamp_min(1e-12))
    zero = torch.zeros_like(lengths[:, 0])
    a_vec = torch.stack([lengths[:, 0] * sin[:, 1], zero, lengths[:, 0] * cos[:, 1]], dim=-1)
    b_vec = torch.stack(
        [
            -lengths[:, 1] * sin[:, 0] * cos_gamma_star,
            lengths[:, 1] * sin[:, 0] * sin_gamma_star,
            lengths[:, 1] * cos[:, 0],
        ],
        dim=-1,
    )
    c_vec = torch.stack([zero, zero, lengths[:, 2]], dim=-1)
    return torch.stack([a_vec, b_vec, c_vec], dim=1)


def volume(cell: Tensor) -> Tensor:
    """``(B,)`` signed cell volumes, Å³."""
    return torch.linalg.det(cell)


def to_fractional(pos: Tensor, cell: Tensor, batch: Tensor) -> Tensor:
    """Fractional coordinates of Cartesian ``pos`` in each atom's cell."""
    return torch.einsum("ni,nij->nj", pos, torch.linalg.inv(cell)[batch])


def to_cartesian(frac: Tensor, cell: Tensor, batch: Tensor) -> Tensor:
    return torch.einsum("ni,nij->nj", frac, cell[batch])


def wrap(frac: Tensor) -> Tensor:
    """Fractional coordinates moved into ``[0, 1)``."""
    return frac - torch.floor(frac)


def min_image(frac_delta: Tensor, cell: Tensor, batch: Tensor) -> Tensor:
    """The Cartesian displacement of fractional ``frac_delta`` through the nearest image (the
    rounding convention: exact for the cells CDVAE's data hold, near-right for very skewed)."""
    return to_cartesian(frac_delta - torch.round(frac_delta), cell, batch)


def scaled_params(params: Tensor, natoms: Tensor) -> Tensor:
    """Lengths divided by the cube root of the atom count (CDVAE's ``scale_length``): a cell's
    size then varies little with how many atoms it holds, which the latent predicts better."""
    scale = natoms.to(params.dtype).pow(1.0 / 3.0).unsqueeze(-1)
    return torch.cat([params[:, :3] / scale, params[:, 3:]], dim=-1)


def unscaled_params(scaled: Tensor, natoms: Tensor) -> Tensor:
    scale = natoms.to(scaled.dtype).pow(1.0 / 3.0).unsqueeze(-1)
    return torch.cat([scaled[:, :3] * scale, scaled[:, 3:]], dim=-1)
