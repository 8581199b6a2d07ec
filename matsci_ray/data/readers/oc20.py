"""Open Catalyst 2020: S2EF (one record per DFT frame) and IS2RE (one per relaxation).

Inputs are OC20 relaxation trajectories (ASE ``.traj``, system id = file stem), for S2EF the
released ``N.extxyz(.xz)`` frame files with their ``N.txt(.xz)`` sidecar, whose line ``i``
is ``system_id,frame_number,reference_energy`` for frame ``i`` (e.g. ``random1000100,frame12,
-0.53``), and for both the ``*.lmdb`` files of OCP/fairchem (the IS2RE/IS2RS release, S2EF
LMDBs; :mod:`matsci_ray.data.readers.oc20_lmdb`), the format chosen by each file's suffix.
Energies from trajectories and extxyz are the raw DFT total energies in eV: the sidecar's
reference energy (the clean slab plus gas-phase references that turn a total energy into an
adsorption energy) is **not** subtracted. LMDB energies are stored as the LMDB holds them, which
for the IS2RE/IS2RS release means adsorption energies; an ingest whose inputs hold both kinds is
refused, so ``energy`` and ``relaxed_energy`` mean one thing within a data set.

Quirks of the OC20 trajectories (see the readers' tests):
- forces are the raw DFT forces; ``atoms.get_forces()`` would zero those on fixed atoms;
- the ``.traj`` files store no tags (``get_tags()`` gives all zeros), so ``tags`` is left out
  rather than claiming every atom is subsurface; the extxyz release does carry them;
- the first ionic step of some relaxations has forces far beyond 100 eV/Å
  (random1000117 frame 1: 351 eV/Å); range checks are left to validation.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from ase import Atoms

from matsci_ray import keys
from matsci_ray.data.readers.ase_frames import (
    DEFAULT_CHUNK_SIZE,
    atoms_to_arrays,
    base_stem,
    fixed_mask,
    iter_frames,
    open_text,
    plan_frames,
    raw_forces,
    split_compression,
    structure_fields,
    tags_or_none,
)
from matsci_ray.data.readers.base import SourceReader
from matsci_ray.data.readers.lmdb_source import plan_lmdb
from matsci_ray.data.readers.oc20_lmdb import (
    IS2RE_ENERGY_FIELDS,
    LMDB_SUFFIX,
    S2EF_ENERGY_FIELDS,
    RecordBuilder,
    check_one_energy_reference,
    is2re_record,
    is_lmdb,
    read_oc20_lmdb,
    s2ef_record,
)
from matsci_ray.data.record import Record, Reject, SourceError, WorkUnit

_CELL_ATOL = 1e-6  # Å; OC20 relaxations keep the cell fixed, to the digits stored


def find_sidecar(file: str | Path) -> Path | None:
    """The ``N.txt``/``N.txt.xz``/``N.txt.gz`` next to an ``N.extxyz(.xz)``, if there is one."""
    path = Path(file)
    name, _ = split_compression(path)
    if not name.endswith(".extxyz"):
        return None
    stem = name[: -len(".extxyz")]
    for suffix in (".txt", ".txt.xz", ".txt.gz"):
        candidate = path.with_name(stem + suffix)
        if candidate.is_file():
            return candidate
    return None


def _sidecar_lines(sidecar: Path, start: int) -> Iterator[str]:
    try:
        with open_text(sidecar) as fh:
            for number, line in enumerate(fh):
                if number >= start:
                    yield line.rstrip("\r\n")
    except (OSError, EOFError, UnicodeDecodeError, ValueError) as exc:
        raise SourceError(str(sidecar), f"unreadable sidecar ({type(exc).__name__})") from None


def _count_lines(sidecar: Path) -> int:
    return sum(1 for _ in _sidecar_lines(sidecar, 0))


def parse_sidecar_line(line: str) -> tuple[str, int]:
    """``(system id, frame number)`` of ``"random1000100,frame12,-0.53"``; ValueError if bad.

    The frame may also be written as a bare number; the reference energy must parse (a line
    that doesn't is more likely misaligned than merely odd) but is not used.
    """
    parts = [part.strip() for part in line.split(",")]
    if len(parts) != 3 or not parts[0]:
        raise ValueError(f"sidecar line {line[:60]!r} is not system_id,frame,reference_energy")
    frame = parts[1].removeprefix("frame")
    if not frame.isdigit():
        raise ValueError(f"sidecar frame {parts[1][:30]!r} is not a frame number")
    float(parts[2])
    return parts[0], int(frame)


def frame_targets(atoms: Atoms) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(structure fields, targets)`` of one labelled frame; ValueError names what is wrong."""
    arrays = atoms_to_arrays(atoms)
    n = len(arrays.atomic_numbers)
    if arrays.energy is None:
        raise ValueError("no energy")
    if arrays.forces is None:
        raise ValueError("no forces")
    if arrays.forces.shape != (n, 3):
        raise ValueError(f"forces have shape {arrays.forces.shape}, expected ({n}, 3)")
    targets: dict[str, Any] = {
        keys.ENERGY: arrays.energy,
        keys.FORCES: arrays.forces,
        keys.FIXED: fixed_mask(atoms),
    }
    tags = tags_or_none(atoms)
    if tags is not None:
        targets[keys.TAGS] = tags
    return structure_fields(atoms), targets


class _OC20Reader(SourceReader):
    """What the two OC20 readers share: LMDB inputs beside the ASE-readable ones."""

    lmdb_energy_fields: ClassVar[tuple[str, ...]]
    lmdb_record: ClassVar[RecordBuilder]

    def __init__(self, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        self.chunk_size = chunk_size

    def inputs(self, paths: list[Path]) -> list[tuple[Path, str]]:
        named = super().inputs(paths)
        check_one_energy_reference([file for file, _ in named], self.lmdb_energy_fields)
        return named

    def plan_lmdb(self, file: Path) -> list[WorkUnit]:
        return plan_lmdb(self.name, file, self.chunk_size)

    def read_lmdb(self, unit: WorkUnit) -> Iterator[Record | Reject]:
        return read_oc20_lmdb(unit, self.dataset, type(self).lmdb_record)


class S2EFReader(_OC20Reader):
    """One record per frame: energy (eV), forces (eV/Å), fixed mask, tags where stored.

    ``group`` is the system id (all frames of one relaxation stay in one split). From a
    ``.traj`` the system is the file stem and ``sample_id`` ``"<input id>:<frame index>"``
    (the input id is the stem when the file lies directly in the directory given, else its
    relative path, so ``a/random1.traj`` and ``b/random1.traj`` stay apart). From an extxyz
    with a sidecar, ``sample_id`` is the sidecar's ``"<system>:<frame>"``, and from an LMDB
    ``"random<sid>:<fid>"``, the same; an extxyz without a sidecar is read as a ``.traj``
    (so a file's frames are grouped together).
    """

    name: ClassVar[str] = "oc20-s2ef"
    dataset: ClassVar[str] = "oc20-s2ef"
    suffixes: ClassVar[tuple[str, ...]] = (
        ".traj",
        ".extxyz",
        ".extxyz.xz",
        ".extxyz.gz",
        LMDB_SUFFIX,
    )
    targets: ClassVar[tuple[str, ...]] = (keys.ENERGY, keys.FORCES, keys.TAGS, keys.FIXED)
    lmdb_energy_fields: ClassVar[tuple[str, ...]] = S2EF_ENERGY_FIELDS
    lmdb_record: ClassVar[RecordBuilder] = s2ef_record

    def plan(self, file: Path) -> list[WorkUnit]:
        if is_lmdb(file):
            return self.plan_lmdb(file)
        units = plan_frames(self.name, file, self.chunk_size)
        sidecar = find_sidecar(file)
        if sidecar is not None and units:
            frames, lines = units[-1].stop, _count_lines(sidecar)
            if frames != lines:
                # Line i labels frame i; a count mismatch means every label may be shifted.
                raise SourceError(str(file), f"{frames} frames but {lines} lines in {sidecar}")
        return units

    def read(self, unit: WorkUnit) -> Iterator[Record | Reject]:
        if is_lmdb(unit.file):
            yield from self.read_lmdb(unit)
            return
        file = unit.file
        sidecar = find_sidecar(file)
        labels = _sidecar_lines(sidecar, unit.start) if sidecar is not None else None
        system, prefix = base_stem(file), unit.sample_prefix
        for index, atoms in iter_frames(file, unit.start, unit.stop):
            key = str(index)
            group, name, frame = system, prefix, index
            if labels is not None:
                line = next(labels, None)
                if line is None:
                    raise SourceError(str(sidecar), f"no line for frame {index} of {file}", key)
                try:
                    group, frame = parse_sidecar_line(line)
                    name = group
                except ValueError as exc:
                    yield Reject(file, key, str(exc))
                    continue
            try:
                structure, targets = frame_targets(atoms)
            except ValueError as exc:
                yield Reject(file, key, str(exc))
                continue
            yield Record(
                dataset=self.dataset,
                sample_id=f"{name}:{frame}",
                group=group,
                targets=targets,
                source_file=file,
                source_key=key,
                **structure,
            )


class IS2REReader(_OC20Reader):
    """One record per relaxation: the initial structure and the relaxed result.

    From a trajectory, positions/cell are frame 0's; ``relaxed_energy`` (eV) and
    ``relaxed_positions`` (Å) the last frame's; ``fixed`` and ``tags`` (where stored) frame
    0's. The trajectory is streamed once, holding only its first and latest frame, and
    rejected if the atoms or the cell change along it or a frame's forces do not have shape
    (n, 3). From an LMDB, one record per system (``sample_id`` and ``group`` ``random<sid>``,
    as a trajectory's file stem). ``chunk_size`` (records per work unit) applies to LMDBs: a
    trajectory is one record.
    """

    name: ClassVar[str] = "oc20-is2re"
    dataset: ClassVar[str] = "oc20-is2re"
    suffixes: ClassVar[tuple[str, ...]] = (".traj", LMDB_SUFFIX)
    targets: ClassVar[tuple[str, ...]] = (
        keys.RELAXED_ENERGY,
        keys.RELAXED_POSITIONS,
        keys.TAGS,
        keys.FIXED,
    )
    lmdb_energy_fields: ClassVar[tuple[str, ...]] = IS2RE_ENERGY_FIELDS
    lmdb_record: ClassVar[RecordBuilder] = is2re_record

    def plan(self, file: Path) -> list[WorkUnit]:
        return self.plan_lmdb(file) if is_lmdb(file) else super().plan(file)

    def read(self, unit: WorkUnit) -> Iterator[Record | Reject]:
        if is_lmdb(unit.file):
            yield from self.read_lmdb(unit)
            return
        file = unit.file
        system = base_stem(file)
        first: Atoms | None = None
        last: Atoms | None = None
        last_index = -1
        for index, atoms in iter_frames(file):
            try:
                problem = self._check(first, atoms, index)
            except ValueError as exc:
                problem = f"frame {index}: {exc}"
            if problem is not None:
                yield Reject(file, system, problem)
                return
            if first is None:
                first = atoms
            last, last_index = atoms, index
        if first is None or last is None:
            raise SourceError(file, "empty: the trajectory has no frames")
        initial = structure_fields(first)
        try:
            final = atoms_to_arrays(last)
        except ValueError as exc:
            yield Reject(file, system, f"last frame {last_index}: {exc}")
            return
        if final.energy is None:
            yield Reject(file, system, f"last frame {last_index} has no energy")
            return
        targets: dict[str, Any] = {
            keys.RELAXED_ENERGY: final.energy,
            keys.RELAXED_POSITIONS: final.positions,
            keys.FIXED: fixed_mask(first),
        }
        tags = tags_or_none(first)
        if tags is not None:
            targets[keys.TAGS] = tags
        yield Record(
            dataset=self.dataset,
            sample_id=unit.sample_prefix,  # the system, or its path under the directory given
            group=system,
            targets=targets,
            source_file=file,
            source_key=f"0..{last_index}",
            **initial,
        )

    @staticmethod
    def _check(first: Atoms | None, atoms: Atoms, index: int) -> str | None:
        """Why frame ``index`` is inconsistent with frame 0, or ``None``."""
        n = len(atoms)
        forces = raw_forces(atoms)
        if forces is not None and forces.shape != (n, 3):
            return f"frame {index}: forces have shape {forces.shape}, expected ({n}, 3)"
        if first is None:
            return None
        if n != len(first) or not np.array_equal(atoms.numbers, first.numbers):
            return f"frame {index}: atomic numbers differ from frame 0"
        if not np.allclose(atoms.cell.array, first.cell.array, rtol=0, atol=_CELL_ATOL):
            return f"frame {index}: cell differs from frame 0"
        return None
