"""LiPS (Li6.75P3S11) molecular dynamics frames: energy (eV) and forces (eV/Å).

Reads the original release's extended XYZ (``energy`` and per-atom ``forces``, plain or
``.xz``/``.gz``) and the MatSciML LMDB devset (``.lmdb``, via ``lips_lmdb``).

Grouping: the whole data set is one MD trajectory, so grouping by trajectory would put every
frame in one split. Each frame is its own group, as in the LiPS benchmark's random frame
split; neighbouring MD frames are correlated, so val/test scores are optimistic relative to
a time-blocked split.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

from matsci_ray import keys
from matsci_ray.data.readers.ase_frames import (
    DEFAULT_CHUNK_SIZE,
    atoms_to_arrays,
    iter_frames,
    plan_frames,
)
from matsci_ray.data.readers.base import SourceReader
from matsci_ray.data.record import Record, Reject, WorkUnit


class LiPSReader(SourceReader):
    """One record per MD frame; ``sample_id`` ``"<input id>:<frame>"`` is also the group."""

    name: ClassVar[str] = "lips"
    dataset: ClassVar[str] = "lips"
    suffixes: ClassVar[tuple[str, ...]] = (
        ".extxyz",
        ".xyz",
        ".extxyz.xz",
        ".extxyz.gz",
        ".lmdb",
    )
    targets: ClassVar[tuple[str, ...]] = (keys.ENERGY, keys.FORCES)

    def __init__(self, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        self.chunk_size = chunk_size

    @staticmethod
    def _is_lmdb(file: str | Path) -> bool:
        return str(file).endswith(".lmdb")

    def plan(self, file: Path) -> list[WorkUnit]:
        if self._is_lmdb(file):
            from matsci_ray.data.readers.lmdb_source import plan_lmdb

            return plan_lmdb(self.name, file, self.chunk_size)
        return plan_frames(self.name, file, self.chunk_size)

    def read(self, unit: WorkUnit) -> Iterator[Record | Reject]:
        if self._is_lmdb(unit.file):
            # Imported here so reading extxyz does not pull in LMDB and the safe unpickler.
            from matsci_ray.data.readers.lips_lmdb import read_lips_lmdb

            yield from read_lips_lmdb(unit, dataset=self.dataset)
            return
        prefix = unit.sample_prefix
        for index, atoms in iter_frames(unit.file, unit.start, unit.stop):
            key = str(index)
            try:
                arrays = atoms_to_arrays(atoms)
            except ValueError as exc:
                yield Reject(unit.file, key, str(exc))
                continue
            n = len(arrays.atomic_numbers)
            if arrays.energy is None:
                yield Reject(unit.file, key, "no energy")
                continue
            if arrays.forces is None:
                yield Reject(unit.file, key, "no forces")
                continue
            if arrays.forces.shape != (n, 3):
                reason = f"forces have shape {arrays.forces.shape}, expected ({n}, 3)"
                yield Reject(unit.file, key, reason)
                continue
            sample_id = f"{prefix}:{index}"
            yield Record(
                dataset=self.dataset,
                sample_id=sample_id,
                group=sample_id,
                atomic_numbers=arrays.atomic_numbers,
                positions=arrays.positions,
                cell=arrays.cell,
                pbc=arrays.pbc,
                targets={keys.ENERGY: arrays.energy, keys.FORCES: arrays.forces},
                source_file=unit.file,
                source_key=key,
            )
