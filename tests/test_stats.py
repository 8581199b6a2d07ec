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
