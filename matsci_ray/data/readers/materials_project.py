"""Materials Project summary documents: MP API JSON lines and the MatSciML LMDB devset.

Targets: formation energy per atom, band gap, Fermi energy (eV), ``is_stable``, and the space
group number from ``symmetry.number``. A ``None`` field means that target is absent for the
record; a record with no target at all is rejected. JSON lines are split into byte ranges (a
unit owns every line that *starts* inside it); gzipped files are one unit each.
"""

from __future__ import annotations

import gzip
import itertools
import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from matsci_ray import keys
from matsci_ray.data.readers.base import SourceReader
from matsci_ray.data.readers.lmdb_source import (
    DEFAULT_CHUNK_SIZE,
    RecordRejected,
    iter_lmdb,
    optional_float,
    optional_int,
    plan_lmdb,
)
from matsci_ray.data.record import Record, Reject, SourceError, WorkUnit

_GZ = (".json.gz", ".jsonl.gz")
_XYZ_TOL = 1e-3  # Å: the dict's redundant "xyz" must agree with lattice @ "abc"


def plan_jsonl(source: str, file: str, chunk_size: int) -> list[WorkUnit]:
    """Byte ranges starting at line starts, each holding at most ``chunk_size`` non-blank lines.

    One streaming pass over the file (only offsets are kept, never lines).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    starts = [0]
    count = offset = 0
    try:
        with open(file, "rb") as f:
            for line in f:
                if line.strip():
                    if count == chunk_size:
                        starts.append(offset)
                        count = 0
                    count += 1
                offset += len(line)
    except OSError as exc:
        raise SourceError(file, f"cannot read: {exc.strerror or exc}") from None
    if count == 0:
        return []
    bounds = [*starts, None]
    return [WorkUnit(source, file, a, b) for a, b in itertools.pairwise(bounds)]


class _LineCounter:
    """Line number of a unit's first line, computed only if a record needs it."""

    def __init__(self, file: str) -> None:
        self._file, self._number = file, None

    def first(self, first_line_start: int) -> int:
        if self._number is None:
            newlines = 0
            with open(self._file, "rb") as f:
                remaining = first_line_start
                while remaining > 0:
                    block = f.read(min(remaining, 1 << 22))
                    if not block:
                        break
                    newlines += block.count(b"\n")
                    remaining -= len(block)
            self._number = newlines + 1
        return self._number


def _jsonl_lines(unit: WorkUnit) -> Iterator[tuple[int | None, int, bytes]]:
    """Yield ``(1-based line number or None, byte offset, raw line)`` for a unit.

    Plain files: the lines starting in ``[start, stop)``; line numbers are left to the caller
    (counting them costs a pass over the file before ``start``). Gzipped files: the whole
    file, with line numbers (offsets are then of the decompressed text).
    """
    file = unit.file
    if file.endswith(_GZ):
        number = offset = 0
        try:
            with gzip.open(file, "rb") as f:
                for number, line in enumerate(f, 1):
                    yield number, offset, line
                    offset += len(line)
        except (OSError, EOFError, zlib.error) as exc:
            raise SourceError(
                file, f"corrupt or truncated gzip after line {number}: {exc}"
            ) from None
        return
    try:
        f = open(file, "rb")  # noqa: SIM115 - "with f" below; only open() errors are SourceError
    except OSError as exc:
        raise SourceError(file, f"cannot read: {exc.strerror or exc}") from None
    with f:
        pos = unit.start
        if pos > 0:
            f.seek(pos - 1)
            if f.read(1) != b"\n":  # mid-line: that line belongs to the previous unit
                pos += len(f.readline())
        while unit.stop is None or pos < unit.stop:
            line = f.readline()
            if not line:
                break
            yield None, pos, line
            pos += len(line)


class MaterialsProjectReader(SourceReader):
    name: ClassVar[str] = "materials-project"
    dataset: ClassVar[str] = "materials-project"
    suffixes: ClassVar[tuple[str, ...]] = (".jsonl", *_GZ, ".lmdb")
    targets: ClassVar[tuple[str, ...]] = (
        keys.FORMATION_ENERGY,
        keys.BAND_GAP,
        keys.EFERMI,
        keys.IS_STABLE,
        keys.SPACE_GROUP,
    )

    def __init__(self, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        self.chunk_size = chunk_size

    def plan(self, file: Path) -> list[WorkUnit]:
        path = str(file)
        if path.endswith(".lmdb"):
            return plan_lmdb(self.name, path, self.chunk_size)
        if path.endswith(_GZ):
            return [WorkUnit(self.name, path)]
        return plan_jsonl(self.name, path, self.chunk_size)

    def read(self, unit: WorkUnit) -> Iterator[Record | Reject]:
        if unit.file.endswith(".lmdb"):
            prefix = unit.sample_prefix
            for key, doc in iter_lmdb(unit):
                yield self._convert(doc, unit.file, key, f"{prefix}:{key}")
            return
        yield from self._read_jsonl(unit)

    def _read_jsonl(self, unit: WorkUnit) -> Iterator[Record | Reject]:
        file, prefix = unit.file, unit.sample_prefix
        counter = _LineCounter(file)
        first_offset: int | None = None
        for index, (known, offset, raw) in enumerate(_jsonl_lines(unit)):
            first_offset = offset if first_offset is None else first_offset
            if not raw.strip():
                continue
            number = known if known is not None else counter.first(first_offset) + index
            key = f"line {number}"
            try:
                doc = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                if not raw.endswith(b"\n"):
                    raise SourceError(
                        file, f"incomplete last line, truncated? ({exc})", key
                    ) from None
                yield Reject(file, key, f"invalid JSON: {exc}")
                continue
            if not isinstance(doc, dict):
                yield Reject(file, key, f"not a JSON object but {type(doc).__name__}")
                continue
            yield self._convert(doc, file, key, f"{prefix}:{number}")

    def _convert(
        self, doc: dict[str, Any], file: str, key: str, fallback_id: str
    ) -> Record | Reject:
        try:
            targets = _targets(doc)
            if not targets:
                raise RecordRejected("no target present")
            numbers, positions, cell, pbc = _structure(doc.get("structure"))
        except RecordRejected as exc:
            return Reject(file, key, str(exc))
        material_id = doc.get("material_id")
        material_id = str(material_id) if material_id is not None else None
        return Record(
            dataset=self.dataset,
            sample_id=material_id or fallback_id,
            atomic_numbers=numbers,
            positions=positions,
            cell=cell,
            pbc=pbc,
            targets=targets,
            material_id=material_id,
            # Without an id, the same material from two files (the devset LMDB holds the very
            # documents of the JSON lines) must land in one split, or test leaks into train.
            group=material_id or structure_fingerprint(numbers, cell),
            source_file=file,
            source_key=key,
        )


def structure_fingerprint(numbers: np.ndarray, cell: np.ndarray) -> str:
    """Composition and volume (to 0.01 Å³): equal for one material serialised two ways."""
    counts = np.bincount(np.asarray(numbers, dtype=np.int64), minlength=119)
    volume = abs(float(np.linalg.det(np.asarray(cell, dtype=np.float64))))
    composition = ",".join(f"{z}:{c}" for z, c in enumerate(counts) if c)
    return f"mp-structure:{composition}|{volume:.2f}"


def _field(obj: Any, name: str) -> Any:
    # symmetry is a dict in JSON and an emmet stand-in (``.fields``) when unpickled.
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(name)
    fields = getattr(obj, "fields", None)
    if isinstance(fields, dict):
        return fields.get(name)
    raise RecordRejected(f"unreadable symmetry of type {type(obj).__name__}")


def _targets(doc: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in (keys.FORMATION_ENERGY, keys.BAND_GAP, keys.EFERMI):
        value = optional_float(doc.get(name), name)
        if value is not None:
            out[name] = value
    stable = doc.get("is_stable")
    if stable is not None:
        if not isinstance(stable, bool | np.bool_):
            raise RecordRejected(f"unparsable is_stable: {stable!r:.60}")
        out[keys.IS_STABLE] = bool(stable)
    number = optional_int(_field(doc.get("symmetry"), "number"), "symmetry.number")
    if number is not None:
        out[keys.SPACE_GROUP] = number
    return out


def _structure(obj: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Atomic numbers, Cartesian positions (Å), cell rows (Å) and pbc of an MP structure."""
    from pymatgen.core import Structure

    xyz = lattice_abc = None
    if isinstance(obj, dict):
        try:
            xyz = [site.get("xyz") for site in obj["sites"]]
            lattice = obj["lattice"]
            if all(lattice.get(x) is not None for x in "abc"):
                lattice_abc = np.array([float(lattice[x]) for x in "abc"])
            structure = Structure.from_dict(obj)
        except Exception as exc:  # pymatgen raises many types on malformed dicts
            raise RecordRejected(f"unparsable structure: {type(exc).__name__}: {exc}") from None
    elif isinstance(obj, Structure):
        structure = obj
    else:
        raise RecordRejected(f"no structure (got {type(obj).__name__})")
    try:
        if not structure.is_ordered:
            bad = next(i for i, s in enumerate(structure) if not s.is_ordered)
            raise RecordRejected(
                f"partial occupancy (disordered site {bad}: {structure[bad].species})"
            )
        numbers = np.array([site.specie.Z for site in structure], dtype=np.int64)
        cell = np.array(structure.lattice.matrix, dtype=np.float64)
        frac = np.array(structure.frac_coords, dtype=np.float64)
        pbc = np.array(structure.lattice.pbc, dtype=bool)
    except RecordRejected:
        raise
    except Exception as exc:  # e.g. DummySpecies has no Z; an old pickle lacks an attribute
        raise RecordRejected(f"unusable structure: {type(exc).__name__}: {exc}") from None
    positions = frac @ cell
    if lattice_abc is not None:
        err = float(np.abs(np.linalg.norm(cell, axis=1) / lattice_abc - 1).max())
        if err > 1e-4:
            raise RecordRejected(f"lattice matrix disagrees with its a, b, c (rel. {err:.3g})")
    if xyz is not None and all(v is not None for v in xyz):
        err = float(np.abs(np.asarray(xyz, dtype=np.float64) - positions).max())
        if err > _XYZ_TOL:
            raise RecordRejected(f"site xyz disagree with lattice @ abc by {err:.3g} Å")
    return numbers, positions, cell, pbc
