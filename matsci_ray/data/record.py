"""The canonical record every reader yields, and the unit of work ingest schedules.

``SourceError`` lives in :mod:`matsci_ray.errors` and is re-exported here for readers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from matsci_ray.errors import SourceError


@dataclass
class Record:
    """One structure in canonical units: positions and cell in Å, energies in eV.

    ``targets`` maps canonical target names (``matsci_ray.keys.TARGETS``) to values: floats for
    scalars, bool for ``is_stable``, int for ``space_group``, ``(n, 3)`` arrays for forces.
    """

    dataset: str
    sample_id: str
    atomic_numbers: np.ndarray
    positions: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray
    targets: dict[str, Any] = field(default_factory=dict)
    group: str | None = None  # split unit; defaults to sample_id
    material_id: str | None = None  # Materials Project id, for the paper's split
    source_file: str = ""
    source_key: str = ""


@dataclass(frozen=True)
class Reject:
    """A record that was read but refused, and why. Listed in the manifest."""

    file: str
    key: str
    reason: str


@dataclass(frozen=True)
class WorkUnit:
    """A slice of one input file that one Ray task ingests.

    ``start``/``stop`` are record indices (LMDB, trajectories) or byte offsets (JSON lines);
    ``stop=None`` means to the end.
    """

    source: str
    file: str
    start: int = 0
    stop: int | None = None

    @property
    def unit_id(self) -> str:
        import hashlib

        digest = hashlib.sha1(f"{self.file}|{self.start}|{self.stop}".encode()).hexdigest()
        return f"{digest[:16]}"


__all__ = ["Record", "Reject", "SourceError", "WorkUnit"]
