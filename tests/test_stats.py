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


def test_energies_per_atom_fit_references_on_composition_fractions() -> None:
    """Formation energy per atom is fitted as ``Σ_Z x_Z e_Z`` (fractions, not counts), and the
    head that reads it out averages its atoms: with a zero network it predicts that fit exactly,
    whatever the cell's size, and its loss is not divided by the atom count."""
    from types import SimpleNamespace

    import torch

    from matsci_ray.models.base import EncoderOutput
    from matsci_ray.tasks.heads import EnergyHead, build_head
    from matsci_ray.tasks.registry import TASKS

    refs = {3: -1.5, 8: -2.5, 26: 0.4}
    rng = np.random.default_rng(1)
    stats = SplitStats()
    for _ in range(80):
        z = rng.choice(list(refs), size=rng.integers(1, 20))
        value = float(np.mean([refs[int(a)] for a in z])) + rng.normal(0, 0.005)
        stats.add(z, {"formation_energy_per_atom": value})
    summary = stats.summary()
    fit = summary["reference_energies"]["formation_energy_per_atom"]
    for z, e in refs.items():
        assert abs(fit["per_element"][str(z)] - e) < 0.01
    assert fit["residual_rms"] < 0.01

    task = TASKS["mp-formation-energy"]
    assert task.readout == "mean" and not task.extensive
    head = build_head(task, node_dim=4, graph_dim=4, hidden=4)
    assert isinstance(head, EnergyHead)
    head.fit_normalisation(summary)
    assert torch.isclose(head.scale, torch.tensor(fit["residual_rms"]).float().clamp(min=1e-3))
    torch.nn.init.zeros_(head.net[-1].weight)
    torch.nn.init.zeros_(head.net[-1].bias)
    small, big = torch.tensor([3, 8]), torch.tensor([3, 8] * 10 + [26] * 5)
    batch = SimpleNamespace(
        z=torch.cat([small, big]), batch=torch.tensor([0] * 2 + [1] * 25), num_graphs=2
    )
    out = EncoderOutput(node=torch.zeros(27, 4), graph=torch.zeros(2, 4))
    pred = head(out, batch)
    expect = [np.mean([fit["per_element"][str(int(a))] for a in z]) for z in (small, big)]
    assert torch.allclose(pred, torch.tensor(expect, dtype=pred.dtype), atol=1e-5)
    target = pred.detach() + head.scale
    loss = head.energy_loss(pred, target, torch.tensor([2, 25]))
    assert torch.isclose(loss, torch.tensor(1.0), atol=1e-3)  # not 1/2² and 1/25²


def test_manifest_without_a_per_atom_fit_falls_back_to_the_mean() -> None:
    """A manifest ingested before formation energies were fitted on composition still loads:
    the head starts from the training mean for every element."""
    import torch

    from matsci_ray.tasks.heads import EnergyHead
    from matsci_ray.tasks.registry import TASKS

    stats = SplitStats()
    for value, z in ((-1.0, [3, 8]), (-2.0, [26, 8, 8])):
        stats.add(np.array(z), {"formation_energy_per_atom": value})
    summary = stats.summary()
    del summary["reference_energies"]["formation_energy_per_atom"]
    head = EnergyHead(TASKS["mp-formation-energy"], node_dim=4, hidden=4)
    head.fit_normalisation(summary)
    assert torch.allclose(head.reference, torch.full_like(head.reference, -1.5))
    assert torch.isclose(head.scale, torch.tensor(0.5))
