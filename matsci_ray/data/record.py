"""The canonical record every reader yields, and the unit of work ingest schedules.

``SourceError`` lives in :mod:`matsci_ray.errors` and is re-exported here for readers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePath
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
    split: str | None = None  # a split the source itself defines (CDVAE's train/val/test files)
    source_file: str = ""
    source_key: str = ""


@dataclass(frozen=True)
class Reject:
    """A record that was read but refused, and why. Listed in the manifest."""

    file: str
    key: str
    reason: str


# Stripped from a file's name in its input id: ``x.extxyz.gz`` holds the same frames as
# ``x.extxyz``, so both are input ``x`` (and a twin given beside its original is caught).
COMPRESSION_SUFFIXES = (".gz", ".xz")


def input_id(relative: str | PurePath) -> str:
    """The id of an input file from its path relative to the inputs' root: ``a/x.extxyz.gz``
    -> ``a/x`` (POSIX separators; compression, then format suffix dropped)."""
    path = PurePath(relative)
    name = path.name
    for suffix in COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    stem = PurePath(name).stem or name
    return (path.parent / stem).as_posix().removeprefix("./")


@dataclass(frozen=True)
class WorkUnit:
    """A slice of one input file that one Ray task ingests.

    ``start``/``stop`` are record indices (LMDB, trajectories) or byte offsets (JSON lines);
    ``stop=None`` means to the end. ``input_id`` names the file in sample ids (its path under
    the root the user gave, see ``SourceReader.inputs``); empty, the file's own name.
    """

    source: str
    file: str
    start: int = 0
    stop: int | None = None
    input_id: str = ""

    @property
    def sample_prefix(self) -> str:
        """The part of every ``sample_id`` read from this unit that names its file."""
        return self.input_id or input_id(PurePath(self.file).name)

    @property
    def unit_id(self) -> str:
        import hashlib

        digest = hashlib.sha1(f"{self.file}|{self.start}|{self.stop}".encode()).hexdigest()
        return f"{digest[:16]}"


__all__ = ["Record", "Reject", "SourceError", "WorkUnit", "input_id"]
