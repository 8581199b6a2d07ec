"""CDVAE's metrics of generated and reconstructed crystals, and the trivial baseline they are
read beside.

* Reconstruction: match rate and RMSE under pymatgen's ``StructureMatcher(stol=0.5,
  angle_tol=10, ltol=0.3)``, a crystal that is not valid counting as unmatched (as CDVAE).
* Validity: structural (every interatomic distance, periodic images included, above 0.5 Å,
  and a cell volume above 0.1 Å³) and compositional (SMACT's charge neutrality and Pauling
  electronegativity test with its 2014 oxidation states, CDVAE's; one-element and all-metal
  compositions pass). SMACT is the optional extra ``pip install -e '.[generative]'``.
* Coverage (recall, precision) over fingerprints, and property statistics (earth mover's
  distance of density and of the number of elements).

Coverage fingerprints are a stand-in for CDVAE's matminer ones (CrystalNN site fingerprints
and Magpie composition features, with fixed distance cut-offs): a structure's fingerprint is
its radial distribution (Gaussian-smeared neighbour distances within 6 Å, per atom), a
composition's the fraction-weighted mean and spread of the project's element descriptors
(:mod:`matsci_ray.models.elements`), both scaled by the reference set's spread. The cut-offs
are the reference set's own: the smallest distance within which every reference crystal has
another reference crystal (the reference set, each crystal left out in turn, covers itself).
A median cut-off is too strict once both must hold for one pair: real crystals of the same
distribution then cover few references. With a dozen references one outlier sets the cut-off,
so score against dozens. Coverage figures are therefore comparable between models here, not
with CDVAE's paper; read them between two references computed the same way: the random
baseline (:func:`random_crystals`) and a sample of the training crystals themselves
(:func:`training_sample`).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from matsci_ray.generative.sampling import Crystals
from matsci_ray.graphs.neighbors import radius_graph_pbc
from matsci_ray.models.blocks import MAX_Z
from matsci_ray.models.elements import element_features

MIN_DISTANCE = 0.5  # Å: CDVAE's structural validity cut-off
MIN_VOLUME = 0.1  # Å³
MATCHER = {"stol": 0.5, "angle_tol": 10, "ltol": 0.3}
RDF_CUTOFF, RDF_BINS, RDF_WIDTH = 6.0, 60, 0.2  # Å
AMU_PER_A3_TO_G_PER_CM3 = 1.66053906660


def structure_valid(numbers: np.ndarray, frac: np.ndarray, cell: np.ndarray) -> bool:
    """No two atoms (or an atom and an image) closer than :data:`MIN_DISTANCE`, a real cell."""
    volume = abs(float(np.linalg.det(cell)))
    if not (np.isfinite(frac).all() and np.isfinite(cell).all()) or volume < MIN_VOLUME:
        return False
    try:
        edges, _, _ = radius_graph_pbc(frac @ cell, cell, np.ones(3, bool), MIN_DISTANCE)
    except ValueError:  # a degenerate cell
        return False
    return edges.shape[1] == 0


def composition_valid(numbers: np.ndarray) -> bool:
    """SMACT validity of a composition (CDVAE's rules, module docstring)."""
    try:
        from smact.screening import smact_validity
    except ImportError as error:
        raise ImportError(
            "compositional validity needs SMACT: pip install -e '.[generative]'"
        ) from error
    from pymatgen.core import Composition, Element

    counts = np.bincount(numbers)
    formula = {Element.from_Z(int(z)).symbol: int(n) for z, n in enumerate(counts) if n}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bool(smact_validity(Composition(formula), oxidation_states_set="smact14"))


def validity(crystals: Crystals) -> dict[str, float]:
    """Fractions of structurally, compositionally and wholly valid crystals."""
    structural = np.array([structure_valid(*c) for c in crystals], dtype=bool)
    compositional = np.array([composition_valid(z) for z in crystals.numbers], dtype=bool)
    return {
        "valid_structure": float(structural.mean()) if len(crystals) else math.nan,
        "valid_composition": float(compositional.mean()) if len(crystals) else math.nan,
        "valid": float((structural & compositional).mean()) if len(crystals) else math.nan,
    }


def match(predicted: Crystals, reference: Crystals) -> dict[str, float]:
    """Reconstruction match rate and mean RMSE (of the matched, normalised by
    ``(V / N)^(1/3)`` as pymatgen reports it) of ``predicted[i]`` against ``reference[i]``."""
    from pymatgen.analysis.structure_matcher import StructureMatcher

    matcher = StructureMatcher(**MATCHER)
    rms = []
    for guess, truth, crystal in zip(
        predicted.to_structures(), reference.to_structures(), predicted, strict=True
    ):
        if not (structure_valid(*crystal) and composition_valid(crystal[0])):
            rms.append(None)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            found = matcher.get_rms_dist(guess, truth)
        rms.append(None if found is None else found[0])
    matched = [r for r in rms if r is not None]
    return {
        "match_rate": len(matched) / len(rms) if rms else math.nan,
        "rmse": float(np.mean(matched)) if matched else math.nan,
    }


def radial_fingerprint(numbers: np.ndarray, frac: np.ndarray, cell: np.ndarray) -> np.ndarray:
    """Gaussian-smeared neighbour distances within :data:`RDF_CUTOFF`, per atom."""
    centres = np.linspace(0.0, RDF_CUTOFF, RDF_BINS)
    try:
        _, _, dist = radius_graph_pbc(frac @ cell, cell, np.ones(3, bool), RDF_CUTOFF)
    except ValueError:
        return np.zeros(RDF_BINS)
    smeared = np.exp(-(((dist[:, None] - centres) / RDF_WIDTH) ** 2)).sum(0)
    return smeared / max(len(numbers), 1)


def composition_fingerprint(numbers: np.ndarray) -> np.ndarray:
    """Fraction-weighted mean and standard deviation of the element descriptors."""
    table = element_features(MAX_Z).numpy()
    rows = table[numbers]
    mean = rows.mean(0)
    return np.concatenate([mean, rows.std(0)])


def fingerprints(crystals: Crystals) -> tuple[np.ndarray, np.ndarray]:
    structure = np.stack([radial_fingerprint(*c) for c in crystals])
    composition = np.stack([composition_fingerprint(z) for z in crystals.numbers])
    return structure, composition


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sqrt(np.maximum((a**2).sum(1)[:, None] + (b**2).sum(1) - 2 * a @ b.T, 0.0))


def coverage(generated: Crystals, reference: Crystals) -> dict[str, float]:
    """COV-R (reference crystals with a generated one within both cut-offs) and COV-P
    (generated crystals with a reference one within both), over valid generated crystals."""
    valid = [c for c in generated if structure_valid(*c) and composition_valid(c[0])]
    if not valid or len(reference) < 2:
        return {"cov_recall": 0.0, "cov_precision": 0.0}
    kept = Crystals([c[0] for c in valid], [c[1] for c in valid], np.stack([c[2] for c in valid]))
    ref_s, ref_c = fingerprints(reference)
    gen_s, gen_c = fingerprints(kept)
    close = np.ones((len(reference), len(kept)), dtype=bool)
    for ref, gen in ((ref_s, gen_s), (ref_c, gen_c)):
        scale = ref.std(0) + 1e-8
        ref, gen = ref / scale, gen / scale
        within = _distances(ref, ref) + np.diag(np.full(len(ref), np.inf))
        cutoff = float(within.min(1).max())
        close &= _distances(ref, gen) <= cutoff
    return {
        "cov_recall": float(close.any(1).mean()),
        # precision over every generated crystal: an invalid one covers nothing
        "cov_precision": float(close.any(0).sum() / len(generated)),
    }


def density(numbers: np.ndarray, cell: np.ndarray) -> float:
    """g/cm³."""
    from ase.data import atomic_masses

    volume = abs(float(np.linalg.det(cell)))
    return float(atomic_masses[numbers].sum() / max(volume, 1e-9) * AMU_PER_A3_TO_G_PER_CM3)


def property_emd(generated: Crystals, reference: Crystals) -> dict[str, float]:
    """Earth mover's distances of density and of the number of elements."""
    from scipy.stats import wasserstein_distance

    def stats(crystals: Crystals) -> tuple[list[float], list[int]]:
        return (
            [density(z, c) for z, _, c in crystals],
            [len(set(z.tolist())) for z in crystals.numbers],
        )

    gen_rho, gen_el = stats(generated)
    ref_rho, ref_el = stats(reference)
    return {
        "density_emd": float(wasserstein_distance(gen_rho, ref_rho)),
        "elements_emd": float(wasserstein_distance(gen_el, ref_el)),
    }


def generation_metrics(generated: Crystals, reference: Crystals) -> dict[str, float]:
    return {
        **validity(generated),
        **coverage(generated, reference),
        **property_emd(generated, reference),
    }


def scrambled(crystals: Crystals, seed: int = 0) -> Crystals:
    """Each crystal's own atoms and cell with uniformly random fractional positions."""
    rng = np.random.default_rng(seed)
    frac = [rng.random((len(z), 3)) for z in crystals.numbers]
    return Crystals([z.copy() for z in crystals.numbers], frac, crystals.cells.copy())


def training_sample(training: Crystals, count: int, seed: int = 0) -> Crystals:
    """``count`` training crystals drawn at random: what a generator that memorised its
    training set would emit. Its coverage of the test crystals is the ceiling the stand-in
    fingerprints allow, as the random baseline's is their floor."""
    picks = np.random.default_rng(seed).integers(len(training), size=count)
    return Crystals(
        [training.numbers[i] for i in picks],
        [training.frac[i] for i in picks],
        training.cells[picks],
    )


def random_crystals(training: Crystals, count: int, seed: int = 0) -> Crystals:
    """The trivial baseline: ``count`` crystals each with a random training crystal's atoms
    and cell (so its composition and density) and uniformly random fractional positions."""
    return scrambled(training_sample(training, count, seed), seed + 1)


def summary(values: dict[str, Any]) -> str:
    """``key value, ...`` in three significant digits: the commands' one-line report."""
    return ", ".join(f"{k} {v:.3g}" for k, v in values.items())
