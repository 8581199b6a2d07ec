"""Crystals from latents: CDVAE's annealed Langevin dynamics.

From ``z`` the model predicts the atom count, the lattice and the composition; atoms start at
uniformly random fractional positions with types drawn from the composition, and at each noise
level ``sigma`` (largest first) take ``steps_per_level`` Langevin steps of size
``step_lr * (sigma / sigma_min)^2`` along the decoder's score, types following the decoder's
prediction. ``generate`` draws ``z`` from the prior, ``reconstruct`` takes the encoder's mean;
``reconstruct_positions`` gives the decoder each crystal's true atoms and cell (a test of the
score network alone).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from matsci_ray.generative.lattice import (
    matrix_to_params,
    params_to_matrix,
    to_cartesian,
    to_fractional,
    unscaled_params,
    wrap,
)
from matsci_ray.generative.model import CDVAE


@dataclass(frozen=True)
class Langevin:
    """CDVAE's sampler settings (its ``n_step_each`` and ``step_lr``)."""

    steps_per_level: int = 100
    step_lr: float = 1e-4


@dataclass
class Crystals:
    """Crystals as arrays: per crystal its atomic numbers and fractional coordinates, and
    ``cells`` ``(B, 3, 3)`` (rows are lattice vectors, Å)."""

    numbers: list[np.ndarray]
    frac: list[np.ndarray]
    cells: np.ndarray

    def __len__(self) -> int:
        return len(self.numbers)

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        return iter(zip(self.numbers, self.frac, self.cells, strict=True))

    def to_atoms(self) -> list[Any]:
        from ase import Atoms

        return [Atoms(numbers=z, scaled_positions=f, cell=c, pbc=True) for z, f, c in self]

    def to_structures(self) -> list[Any]:
        from pymatgen.core import Lattice, Structure

        return [Structure(Lattice(c), z.tolist(), f) for z, f, c in self]

    @classmethod
    def concat(cls, parts: list[Crystals]) -> Crystals:
        return cls(
            [z for p in parts for z in p.numbers],
            [f for p in parts for f in p.frac],
            np.concatenate([p.cells for p in parts]) if parts else np.zeros((0, 3, 3)),
        )


def composition_numbers(probs: Tensor, natoms: Tensor) -> Tensor:
    """Atomic numbers of each crystal: ``natoms`` atoms split over the elements in the
    proportions ``probs`` (B, types) by largest remainders, grouped by element."""
    expected = probs * natoms.unsqueeze(-1).to(probs.dtype)
    counts = expected.floor().long()
    short = natoms - counts.sum(-1)
    order = (expected - counts).argsort(dim=-1, descending=True)
    ranks = torch.empty_like(order).scatter_(
        1, order, torch.arange(probs.shape[1]).expand_as(order)
    )
    counts += (ranks < short.unsqueeze(-1)).long()
    classes = torch.arange(probs.shape[1], device=probs.device).expand_as(counts)
    return classes.reshape(-1).repeat_interleave(counts.reshape(-1)) + 1


@torch.no_grad()
def decode(model: CDVAE, z: Tensor, langevin: Langevin, generator: torch.Generator) -> Crystals:
    """Crystals of latents ``z`` (B, latent) by annealed Langevin dynamics."""
    natoms = model.natoms_head(z).argmax(-1).clamp_min(1)
    cell = params_to_matrix(unscaled_params(model.lattice_params(z), natoms))
    numbers = composition_numbers(model.composition_head(z).softmax(-1), natoms)
    return _anneal(model, z, numbers, cell, natoms, langevin, generator, update_types=True)


def _anneal(
    model: CDVAE,
    z: Tensor,
    numbers: Tensor,
    cell: Tensor,
    natoms: Tensor,
    langevin: Langevin,
    generator: torch.Generator,
    update_types: bool,
) -> Crystals:
    """Positions from uniform noise down the noise levels; types follow the decoder's
    prediction when ``update_types``, else stay ``numbers``."""
    index = torch.repeat_interleave(torch.arange(len(z), device=z.device), natoms)
    frac = torch.rand(len(index), 3, generator=generator).to(z.device)
    sigma_min = float(model.sigmas[-1])
    for sigma in model.sigmas.tolist():
        step = langevin.step_lr * (sigma / sigma_min) ** 2
        log_sigma = torch.full((len(index),), math.log(sigma), device=z.device)
        for _ in range(langevin.steps_per_level):
            cart = to_cartesian(frac, cell, index)
            out, logits = model.decoder(z[index], numbers, cart, cell, index, log_sigma)
            noise = torch.randn(cart.shape, generator=generator).to(z.device)
            cart = cart + step * out / sigma + math.sqrt(2 * step) * noise
            frac = wrap(to_fractional(cart, cell, index))
            if update_types:
                numbers = logits.argmax(-1) + 1
    return _crystals(numbers, frac, cell, natoms)


def _crystals(numbers: Tensor, frac: Tensor, cell: Tensor, natoms: Tensor) -> Crystals:
    sections = natoms.cumsum(0)[:-1].cpu().numpy()
    return Crystals(
        np.split(numbers.cpu().numpy(), sections),
        np.split(frac.double().cpu().numpy(), sections),
        cell.double().cpu().numpy(),
    )


def generate(
    model: CDVAE, count: int, langevin: Langevin, seed: int = 0, batch_size: int = 64
) -> Crystals:
    """``count`` crystals sampled from the prior ``z ~ N(0, I)``."""
    generator = torch.Generator().manual_seed(seed)
    device = model.sigmas.device
    parts = []
    for start in range(0, count, batch_size):
        size = min(batch_size, count - start)
        z = torch.randn(size, model.graph_dim, generator=generator).to(device)
        parts.append(decode(model, z, langevin, generator))
    return Crystals.concat(parts)


@torch.no_grad()
def reconstruct(
    model: CDVAE, batch: Any, langevin: Langevin, generator: torch.Generator
) -> Crystals:
    """The crystals of a PyG batch, encoded (latent mean) and decoded."""
    _, mu, _ = model.encode(batch)
    return decode(model, mu, langevin, generator)


@torch.no_grad()
def reconstruct_positions(
    model: CDVAE, batch: Any, langevin: Langevin, generator: torch.Generator
) -> Crystals:
    """The decoder alone: each crystal of a PyG batch keeps its own atoms and cell (in the
    canonical orientation the decoder trains on) and only the positions are sampled, from
    uniform noise, conditioned on the encoder's mean. Set beside atoms placed at random in
    the same cells, this says whether the score network learned geometry, whatever the
    latent heads predict."""
    _, mu, _ = model.encode(batch)
    cell = params_to_matrix(matrix_to_params(batch.cell.to(mu.dtype)))
    return _anneal(model, mu, batch.z, cell, batch.natoms, langevin, generator, update_types=False)
