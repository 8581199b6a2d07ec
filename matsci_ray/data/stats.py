"""Streaming, mergeable statistics of ingested targets.

Each ingest task accumulates sums over its records; the driver merges them. Nothing here ever
holds more than one record's arrays, so statistics cost no memory however large the data set.
Total-energy targets also accumulate the normal equations of ``E ≈ Σ_Z n_Z · e_Z`` so that
per-element reference energies can be fitted by least squares on composition afterwards;
energies per atom (formation energy) do the same on composition fractions, ``e ≈ Σ_Z x_Z · e_Z``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from matsci_ray.keys import TARGETS

NUM_Z = 119  # index by atomic number; 0 unused


@dataclass
class Moments:
    count: int = 0
    total: float = 0.0
    total_sq: float = 0.0
    low: float = float("inf")
    high: float = float("-inf")

    def add(self, values: np.ndarray) -> None:
        v = np.asarray(values, dtype=np.float64).reshape(-1)
        if v.size == 0:
            return
        self.count += v.size
        self.total += float(v.sum())
        self.total_sq += float(np.dot(v, v))
        self.low = min(self.low, float(v.min()))
        self.high = max(self.high, float(v.max()))

    def merge(self, other: Moments) -> None:
        self.count += other.count
        self.total += other.total
        self.total_sq += other.total_sq
        self.low = min(self.low, other.low)
        self.high = max(self.high, other.high)

    def summary(self) -> dict[str, float | int]:
        if self.count == 0:
            return {"count": 0}
        mean = self.total / self.count
        var = max(self.total_sq / self.count - mean * mean, 0.0)
        return {
            "count": self.count,
            "mean": mean,
            "std": var**0.5,
            "min": self.low,
            "max": self.high,
        }

    def to_json(self) -> list[float]:
        return [self.count, self.total, self.total_sq, self.low, self.high]

    @classmethod
    def from_json(cls, data: list[float]) -> Moments:
        return cls(int(data[0]), float(data[1]), float(data[2]), float(data[3]), float(data[4]))


@dataclass
class CompositionFit:
    """Normal equations ``XᵀX e = Xᵀy`` with X the element counts of each structure, or its
    element fractions (``fractions=True``) for energies per atom."""

    xtx: np.ndarray = field(default_factory=lambda: np.zeros((NUM_Z, NUM_Z)))
    xty: np.ndarray = field(default_factory=lambda: np.zeros(NUM_Z))
    yty: float = 0.0
    count: int = 0

    def add(self, atomic_numbers: np.ndarray, energy: float, fractions: bool = False) -> None:
        counts = np.bincount(atomic_numbers, minlength=NUM_Z).astype(np.float64)
        if fractions:
            counts /= len(atomic_numbers)
        nz = np.nonzero(counts)[0]
        self.xtx[np.ix_(nz, nz)] += np.outer(counts[nz], counts[nz])
        self.xty[nz] += counts[nz] * energy
        self.yty += energy * energy
        self.count += 1

    def merge(self, other: CompositionFit) -> None:
        self.xtx += other.xtx
        self.xty += other.xty
        self.yty += other.yty
        self.count += other.count

    def mean_per_atom(self) -> float:
        """Least-squares ``mu`` of ``E ≈ mu · N``: ``Σ N E / Σ N²`` from the normal equations."""
        total = float(self.xtx.sum())
        return float(self.xty.sum()) / total if total > 0 else 0.0

    def solve(self, ridge: float = 1e-6) -> dict[int, float]:
        """Reference energy per element present (eV/atom), as ``mu + delta_Z``.

        The ridge shrinks each ``delta_Z`` towards zero, so an element whose reference the
        compositions cannot separate (few systems, elements that always occur together) gets
        the mean per-atom energy rather than an arbitrary value of the collinear set.
        """
        present = np.nonzero(np.diag(self.xtx))[0]
        if present.size == 0:
            return {}
        mu = self.mean_per_atom()
        a = self.xtx[np.ix_(present, present)]
        a = a + ridge * np.trace(a) / present.size * np.eye(present.size)
        rhs = self.xty[present] - mu * self.xtx[np.ix_(present, present)].sum(axis=1)
        delta = np.linalg.solve(a, rhs)
        return {int(z): mu + float(d) for z, d in zip(present, delta, strict=True)}

    def residual_rms(self, refs: dict[int, float]) -> float:
        """RMS per structure of ``E - Σ n_Z e_Z``, from the normal equations alone."""
        if self.count == 0:
            return 0.0
        e = np.zeros(NUM_Z)
        for z, value in refs.items():
            e[z] = value
        rss = self.yty - 2.0 * float(e @ self.xty) + float(e @ self.xtx @ e)
        return float(np.sqrt(max(rss, 0.0) / self.count))

    def to_json(self) -> dict[str, Any]:
        rows, cols = np.nonzero(self.xtx)
        nz = np.nonzero(self.xty)[0]
        return {
            "count": self.count,
            "yty": self.yty,
            "xtx": [
                [int(r), int(c), float(self.xtx[r, c])] for r, c in zip(rows, cols, strict=True)
            ],
            "xty": [[int(z), float(self.xty[z])] for z in nz],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CompositionFit:
        fit = cls(count=int(data["count"]), yty=float(data["yty"]))
        for r, c, v in data["xtx"]:
            fit.xtx[int(r), int(c)] = v
        for z, v in data["xty"]:
            fit.xty[int(z)] = v
        return fit


@dataclass
class SplitStats:
    """Everything accumulated for one split of one data set."""

    records: int = 0
    atoms: Moments = field(default_factory=Moments)
    elements: np.ndarray = field(default_factory=lambda: np.zeros(NUM_Z, dtype=np.int64))
    targets: dict[str, Moments] = field(default_factory=dict)
    per_atom: dict[str, Moments] = field(default_factory=dict)  # extensive targets / natoms
    fits: dict[str, CompositionFit] = field(default_factory=dict)

    def add(self, atomic_numbers: np.ndarray, targets: dict[str, Any]) -> None:
        self.records += 1
        n = len(atomic_numbers)
        self.atoms.add(np.array([n]))
        self.elements += np.bincount(atomic_numbers, minlength=NUM_Z)
        for name, value in targets.items():
            spec = TARGETS[name]
            if spec.kind in ("per_atom_int", "per_atom_bool"):
                continue  # masks and tags: no moments worth normalising by
            self.targets.setdefault(name, Moments()).add(np.asarray(value, dtype=np.float64))
            if spec.extensive:
                self.per_atom.setdefault(name, Moments()).add(np.array([value / n]))
            if spec.extensive or spec.per_atom_energy:
                self.fits.setdefault(name, CompositionFit()).add(
                    atomic_numbers, float(value), fractions=spec.per_atom_energy
                )

    def merge(self, other: SplitStats) -> None:
        self.records += other.records
        self.atoms.merge(other.atoms)
        self.elements += other.elements
        for attr in ("targets", "per_atom", "fits"):
            mine, theirs = getattr(self, attr), getattr(other, attr)
            for name, acc in theirs.items():
                if name in mine:
                    mine[name].merge(acc)
                else:
                    mine[name] = acc

    def to_json(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "atoms": self.atoms.to_json(),
            "elements": {str(z): int(c) for z, c in enumerate(self.elements) if c},
            "targets": {k: m.to_json() for k, m in self.targets.items()},
            "per_atom": {k: m.to_json() for k, m in self.per_atom.items()},
            "fits": {k: f.to_json() for k, f in self.fits.items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SplitStats:
        stats = cls(records=int(data["records"]), atoms=Moments.from_json(data["atoms"]))
        for z, c in data["elements"].items():
            stats.elements[int(z)] = c
        stats.targets = {k: Moments.from_json(v) for k, v in data["targets"].items()}
        stats.per_atom = {k: Moments.from_json(v) for k, v in data["per_atom"].items()}
        stats.fits = {k: CompositionFit.from_json(v) for k, v in data["fits"].items()}
        return stats

    def summary(self) -> dict[str, Any]:
        """The human-readable block written into ``manifest.json``."""
        return {
            "records": self.records,
            "atoms_per_record": self.atoms.summary(),
            "element_counts": {str(z): int(c) for z, c in enumerate(self.elements) if c},
            "targets": {k: m.summary() for k, m in sorted(self.targets.items())},
            "targets_per_atom": {k: m.summary() for k, m in sorted(self.per_atom.items())},
            "reference_energies": {k: self._fit_summary(f) for k, f in sorted(self.fits.items())},
        }

    @staticmethod
    def _fit_summary(fit: CompositionFit) -> dict[str, Any]:
        refs = fit.solve()
        return {
            "per_element": {str(z): e for z, e in refs.items()},
            "mean_per_atom": fit.mean_per_atom(),  # the reference of elements not seen here
            "residual_rms": fit.residual_rms(refs),
            "count": fit.count,
        }
