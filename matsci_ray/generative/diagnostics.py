"""What CDVAE's predictors get right, apart from the decoder.

Reconstruction and generation metrics fail alike when the atom count, the cell or the
composition predicted from the latent is wrong, and do not say which. These scores do: on
the encoder's means (what reconstruction decodes from), each head against the truth and the
lattice against the training mean (what a head that learned nothing predicts); on draws from
the prior (what generation decodes from), whether the atom counts are ones the training set
holds, which fails when the encoder's latents stray far from the prior (a large KL term).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from matsci_ray.generative.lattice import matrix_to_params, scaled_params
from matsci_ray.generative.model import CDVAE
from matsci_ray.generative.sampling import composition_numbers


@torch.no_grad()
def predictor_scores(model: CDVAE, batches: Iterable[Any]) -> dict[str, float]:
    """Over the crystals of ``batches`` (PyG batches with radius graphs): the fraction whose
    atom count is predicted right; the mean absolute error of the scaled lattice lengths (Å,
    divided by the cube root of the atom count) and angles (degrees), and the training
    mean's; the fraction whose composition (every element's count, at the true atom count)
    is predicted exactly."""
    right = exact = count = 0
    error, baseline = torch.zeros(6), torch.zeros(6)
    for batch in batches:
        _, mu, _ = model.encode(batch)
        true = scaled_params(matrix_to_params(batch.cell), batch.natoms)
        error += (model.lattice_params(mu) - true).abs().sum(0)
        baseline += (model.lattice_mean - true).abs().sum(0)
        right += int((model.natoms_head(mu).argmax(-1) == batch.natoms).sum())
        probs = model.composition_head(mu).softmax(-1)
        exact += same_compositions(composition_numbers(probs, batch.natoms), batch.z, batch.natoms)
        count += batch.num_graphs
    count = max(count, 1)
    return {
        "natoms_accuracy": right / count,
        "lattice_length_mae": float(error[:3].mean()) / count,
        "lattice_length_mae_of_mean": float(baseline[:3].mean()) / count,
        "lattice_angle_mae": float(error[3:].mean()) / count,
        "lattice_angle_mae_of_mean": float(baseline[3:].mean()) / count,
        "composition_exact": exact / count,
    }


def same_compositions(predicted: torch.Tensor, true: torch.Tensor, natoms: torch.Tensor) -> int:
    """How many crystals (atoms of ``natoms`` each, in order) hold the same atoms in both."""
    sizes = natoms.tolist()
    pairs = zip(predicted.split(sizes), true.split(sizes), strict=True)
    return sum(bool(torch.equal(a.sort().values, b.sort().values)) for a, b in pairs)


@torch.no_grad()
def prior_natoms_seen(model: CDVAE, seen: set[int], count: int = 256, seed: int = 0) -> float:
    """The fraction of ``count`` latents drawn from the prior whose predicted atom count is
    one of ``seen`` (the training crystals' atom counts)."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(count, model.graph_dim, generator=generator).to(model.sigmas.device)
    natoms = model.natoms_head(z).argmax(-1).tolist()
    return sum(n in seen for n in natoms) / count


@torch.no_grad()
def denoising_by_level(model: CDVAE, batches: Iterable[Any], seed: int = 0) -> list[dict]:
    """Per noise level (largest first): the decoder's coordinate loss on the crystals of
    ``batches`` noised at that level (their true atom types, the encoder's mean as latent),
    and the loss of a decoder that outputs zero (the target's mean square). ``ratio`` is 1
    where the decoder learned nothing at that level and 0 where it denoises exactly; the
    sampler's last levels set the final positions."""
    from matsci_ray.generative.objective import noised_positions

    levels = len(model.sigmas)
    loss, zero, atoms = torch.zeros(levels), torch.zeros(levels), 0
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for batch in batches:
            _, mu, _ = model.encode(batch)
            atoms += len(batch.z)
            for level in range(levels):
                at = torch.full((batch.num_graphs,), level, device=mu.device)
                noisy, cell, target, sigma = noised_positions(model, batch, at)
                log_sigma = sigma.log().squeeze(-1)
                out, _ = model.decoder(
                    mu[batch.batch], batch.z, noisy, cell, batch.batch, log_sigma
                )
                loss[level] += float((out - target).pow(2).sum())
                zero[level] += float(target.pow(2).sum())
    atoms = max(atoms, 1)
    return [
        {
            "sigma": float(sigma),
            "loss": float(loss[i]) / atoms,
            "zero_output_loss": float(zero[i]) / atoms,
            "ratio": float(loss[i] / zero[i].clamp_min(1e-12)),
        }
        for i, sigma in enumerate(model.sigmas.tolist())
    ]
