"""fairchem's ASE-LMDB files (``*.aselmdb``: OMat24 and fairchem's other ASE-LMDB releases).

Read through ASE's database API (``ase.db.connect``), whose ``aselmdb`` backend is the
``ase-db-backends`` package (the optional extra ``matsci-ray[aselmdb]``): the rows fairchem
writes are ASE rows, zlib-compressed JSON under ASCII ids, so no pickle is involved.

Targets: the row's calculator results as stored: ``energy`` (eV), ``forces`` (eV/Å) and
``stress`` (ASE's convention: eV/Å³, ASE's sign, 6 Voigt components or a 3×3 tensor), each
where the row has it; ``fixed`` from a ``FixAtoms`` constraint and ``tags`` where stored. With
``--target NAME=KEY`` the targets are the user's instead, each looked up in the calculator
results, then the row's key-value pairs, then its ``data`` (a row lacking one is rejected).

``sample_id`` is ``<input id>:<row id>``; rows carrying fairchem's ``sid`` (the system id of
OC20-style data) are grouped by it, so frames of one system stay in one split, across files.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from matsci_ray import keys
from matsci_ray.data.readers.ase_frames import fixed_mask, structure_fields
from matsci_ray.data.readers.base import SourceReader
from matsci_ray.data.readers.generic import convert_target
from matsci_ray.data.readers.lmdb_source import open_lmdb
from matsci_ray.data.record import Record, Reject, SourceError, WorkUnit
from matsci_ray.errors import ConfigError

DEFAULT_CHUNK_SIZE = 2000
SUFFIX = ".aselmdb"
# The calculator results a row may carry, taken when no --target is given.
DEFAULT_TARGETS: dict[str, str] = {
    keys.ENERGY: "energy",
    keys.FORCES: "forces",
    keys.STRESS: "stress",
}
SYSTEM_ID = "sid"  # fairchem's key-value pair naming the system a frame belongs to


def connect(file: str) -> Any:
    """``file`` opened read-only through ASE's database API and its ``aselmdb`` backend."""
    import ase.db

    # The backend's own open of a damaged file raises again from its destructor, and a
    # truncated one would fault on first read: the shared LMDB check refuses both first.
    with open_lmdb(file):
        pass
    try:
        return ase.db.connect(file, type="aselmdb", readonly=True, use_lock_file=False)
    except ImportError:
        raise ConfigError(
            "reading .aselmdb needs the ase-db-backends package: pip install 'matsci-ray[aselmdb]'"
        ) from None
    except Exception as exc:  # lmdb.Error, zlib.error, JSON errors on a damaged file
        raise SourceError(file, f"not a readable ASE-LMDB ({type(exc).__name__}: {exc})") from None


def row_value(row: Any, key: str) -> Any:
    """``key`` in the row's calculator results, key-value pairs or data; ``None`` if absent."""
    value = row.get(key)
    if value is None:
        value = row.key_value_pairs.get(key)
    if value is None:
        value = row.data.get(key)
    return value


class AseLmdbReader(SourceReader):
    """Rows of ``.aselmdb`` files, in id order, split into units of ``chunk_size`` rows."""

    name: ClassVar[str] = "omat24"
    dataset: ClassVar[str] = "omat24"
    suffixes: ClassVar[tuple[str, ...]] = (SUFFIX,)
    target_option: ClassVar[bool] = True  # the ingest command's --target applies

    def __init__(
        self, targets: Mapping[str, str] | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE
    ) -> None:
        unknown = [name for name in targets or {} if name not in keys.TARGETS]
        if unknown:
            raise ConfigError(
                f"unknown target(s) {', '.join(unknown)}; allowed: {', '.join(keys.TARGETS)}"
            )
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.required = dict(targets or {})
        self.keys = self.required or DEFAULT_TARGETS
        extra = (keys.FIXED, keys.TAGS) if not self.required else ()
        self.targets = (*self.keys, *extra)  # type: ignore[misc]
        self.chunk_size = chunk_size

    def plan(self, file: Path) -> list[WorkUnit]:
        db = connect(str(file))
        count = len(db.ids)
        db.close()
        return [
            WorkUnit(self.name, str(file), start, min(start + self.chunk_size, count))
            for start in range(0, count, self.chunk_size)
        ]

    def read(self, unit: WorkUnit) -> Iterator[Record | Reject]:
        db = connect(unit.file)
        try:
            for row_id in db.ids[unit.start : unit.stop]:
                try:
                    row = db.get(id=row_id)
                except Exception as exc:  # a damaged value: zlib or JSON errors
                    message = f"unreadable row ({type(exc).__name__}: {exc})"
                    raise SourceError(unit.file, message, str(row_id)) from None
                yield self._convert(row, unit, str(row_id))
        finally:
            db.close()

    def _convert(self, row: Any, unit: WorkUnit, key: str) -> Record | Reject:
        atoms = row.toatoms()
        targets: dict[str, Any] = {}
        for name, row_key in self.keys.items():
            value = row_value(row, row_key)
            if value is None:
                if self.required:
                    return Reject(unit.file, key, f"{name}: no {row_key!r} in the row")
                continue
            try:
                targets[name] = convert_target(keys.TARGETS[name], value, len(atoms))
            except ValueError as exc:
                return Reject(unit.file, key, f"{name} (from {row_key!r}): {exc}")
        if not self.required:
            targets.update(_constraint_targets(atoms))
        if not targets:
            return Reject(unit.file, key, "no energy, forces or stress in the row")
        sample_id = f"{unit.sample_prefix}:{key}"
        system = row.key_value_pairs.get(SYSTEM_ID)
        return Record(
            dataset=self.dataset,
            sample_id=sample_id,
            group=f"{SYSTEM_ID}={system}" if system is not None else None,
            targets=targets,
            source_file=unit.file,
            source_key=key,
            **structure_fields(atoms),
        )


def _constraint_targets(atoms: Any) -> dict[str, np.ndarray]:
    """``fixed`` where a ``FixAtoms`` constraint is stored, ``tags`` where tags are."""
    out: dict[str, np.ndarray] = {}
    if atoms.constraints:
        out[keys.FIXED] = fixed_mask(atoms)
    if atoms.has("tags"):
        out[keys.TAGS] = np.asarray(atoms.get_tags(), dtype=np.int64)
    return out
