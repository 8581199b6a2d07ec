"""Streaming statistics merge exactly and fit reference energies by least squares."""

from __future__ import annotations

import numpy as np

from matsci_ray.data.stats import SplitStats


def test_merge_equals_single_pass_and_fit_recovers_references() -> None:
    rng = np.random.default_rng(0)
    refs = {1: -3.4, 8: -7.2, 29: -3.7}
    whole, parts = SplitStats(), [SplitStats(), SplitStats()]
    energies = []
    for k in range(60):
        z = rng.choice(list(refs), size=rng.integers(2, 12))
        energy = sum(refs[int(a)] for a in z) + rng.normal(0, 0.01)
        energies.append(energy)
        forces = rng.normal(size=(len(z), 3))
        for stats in (whole, parts[k % 2]):
            stats.add(z, {"energy": energy, "forces": forces})
    merged = SplitStats.from_json(parts[0].to_json())
    merged.merge(SplitStats.from_json(parts[1].to_json()))
    a, b = whole.summary(), merged.summary()
    assert a["records"] == b["records"] == 60
    assert np.isclose(a["targets"]["energy"]["mean"], np.mean(energies))
    assert np.isclose(a["targets"]["energy"]["std"], b["targets"]["energy"]["std"])
    fit = b["reference_energies"]["energy"]
    for z, e in refs.items():
        assert abs(fit["per_element"][str(z)] - e) < 0.01
    assert fit["residual_rms"] < 0.02


def test_inseparable_elements_get_the_mean_per_atom_energy() -> None:
    """Two elements that always occur 1:1 cannot be told apart: both refs sit at the data's
    mean per-atom energy (split evenly), not at an arbitrary point of the collinear line; and
    the head gives an element never seen in training that same mean, not zero."""
    import torch

    from matsci_ray.tasks.heads import EnergyHead
    from matsci_ray.tasks.registry import TASKS

    stats = SplitStats()
    for n in range(1, 9):  # Pt_n Cl_n with E = n (e_Pt + e_Cl), e_Pt + e_Cl = -8
        stats.add(np.array([78, 17] * n), {"energy": -8.0 * n, "forces": np.zeros((2 * n, 3))})
    fit = stats.summary()["reference_energies"]["energy"]
    assert np.isclose(fit["mean_per_atom"], -4.0)
    assert np.isclose(fit["per_element"]["78"], -4.0, atol=1e-3)
    assert np.isclose(fit["per_element"]["17"], -4.0, atol=1e-3)
    assert fit["residual_rms"] < 1e-3

    head = EnergyHead(TASKS["s2ef-forces"], node_dim=4, hidden=4)
    head.fit_normalisation(stats.summary())
    assert torch.isclose(head.reference[40], torch.tensor(-4.0))  # Zr: never seen
