"""CDVAE's training objective on a batch: the VAE's KL term, the predictors' losses (atom
count, lattice, composition, property) and the denoising losses of the score decoder at a
random noise level per crystal. Wrapped in :class:`Objective`, an ``nn.Module`` whose
``forward`` is the loss, so DDP synchronises its gradients.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from matsci_ray.generative.decoder import NUM_TYPES
from matsci_ray.generative.lattice import (
    matrix_to_params,
    min_image,
    params_to_matrix,
    scaled_params,
    to_cartesian,
    to_fractional,
    wrap,
)
from matsci_ray.generative.model import CDVAE

# Every term Objective returns: the same keys on every rank, whatever its batches held.
TERMS = ("kl", "natoms", "lattice", "composition", "property", "coord", "type", "loss")


def type_classes(z: Tensor) -> Tensor:
    """Class index of atomic numbers (Z 1..100 is class 0..99; heavier Z share the last)."""
    return (z - 1).clamp(0, NUM_TYPES - 1)


def kl_divergence(mu: Tensor, logvar: Tensor) -> Tensor:
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(-1).mean()


def predictor_losses(model: CDVAE, z: Tensor, batch: Any, target: str | None) -> dict[str, Tensor]:
    """Atom count, lattice, composition and (where the batch has it) property losses."""
    natoms, index = batch.natoms, batch.batch
    scaled = scaled_params(matrix_to_params(batch.cell), natoms)
    normalised = (scaled - model.lattice_mean) / model.lattice_std
    composition = model.composition_head(z)[index]
    losses = {
        "natoms": F.cross_entropy(model.natoms_head(z), natoms.clamp(max=model.max_atoms)),
        "lattice": F.mse_loss(model.lattice_head(z), normalised),
        "composition": F.cross_entropy(composition, type_classes(batch.z)),
    }
    mask = getattr(batch, f"{target}_mask", None) if target else None
    if mask is None:  # zero, with a gradient path: DDP expects every parameter used
        losses["property"] = 0.0 * model.property_head(z).sum()
    else:
        wanted = (getattr(batch, target) - model.property_mean) / model.property_std
        error = (model.property_head(z).squeeze(-1) - wanted).pow(2)
        losses["property"] = (error * mask).sum() / mask.sum().clamp_min(1)
    return losses


def noised_positions(
    model: CDVAE, batch: Any, level: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Each crystal's positions noised at its ``level`` (an index into ``model.sigmas``), in
    its canonical cell: ``(noisy Cartesian positions (N, 3), canonical cells (B, 3, 3), the
    decoder's target (true - noisy, minimum image) / sigma (N, 3), sigma (N, 1))``."""
    index = batch.batch
    sigma = model.sigmas[level][index].unsqueeze(-1)
    cell = params_to_matrix(matrix_to_params(batch.cell))  # canonical: c along z
    frac = to_fractional(batch.pos, batch.cell, index)
    noisy_cart = to_cartesian(frac, cell, index) + torch.randn_like(batch.pos) * sigma
    noisy = wrap(to_fractional(noisy_cart, cell, index))
    target = min_image(frac - noisy, cell, index) / sigma
    return to_cartesian(noisy, cell, index), cell, target, sigma


def denoising_losses(model: CDVAE, z: Tensor, batch: Any) -> dict[str, Tensor]:
    """Noise every crystal at a random level (positions in Å, types on one-hot vectors) in
    its canonical cell; the decoder is scored on the way back (``(true - noisy) / sigma``,
    unit scale at every level) and on the true types."""
    index = batch.batch
    level = torch.randint(len(model.sigmas), (batch.num_graphs,), device=z.device)
    noisy, cell, target, sigma = noised_positions(model, batch, level)
    type_sigma = model.type_sigmas[level][index].unsqueeze(-1)
    classes = type_classes(batch.z)
    one_hot = F.one_hot(classes, NUM_TYPES).to(z.dtype)
    probs = (one_hot + torch.randn_like(one_hot) * type_sigma).abs()
    noisy_types = torch.multinomial(probs, 1).squeeze(-1) + 1
    coords, logits = model.decoder(
        z[index], noisy_types, noisy, cell, index, sigma.log().squeeze(-1)
    )
    return {
        "coord": (coords - target).pow(2).sum(-1).mean(),
        "type": F.cross_entropy(logits, classes),
    }


class Objective(nn.Module):
    """``forward(batch)``: the weighted total (``"loss"``) and each term, for one batch."""

    def __init__(self, model: CDVAE, target: str | None) -> None:
        super().__init__()
        self.model = model
        self.target = target

    def forward(self, batch: Any) -> dict[str, Tensor]:
        _, mu, logvar = self.model.encode(batch)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        losses = {"kl": kl_divergence(mu, logvar)}
        losses.update(predictor_losses(self.model, z, batch, self.target))
        losses.update(denoising_losses(self.model, z, batch))
        weights = self.model.weights
        losses["loss"] = torch.stack([weights[k] * v for k, v in losses.items()]).sum()
        return losses
