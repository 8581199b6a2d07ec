"""MPtrj (``MPtrj_2022.9_full.json``): the Materials Project relaxation frames behind CHGNet,
MACE-MP and SevenNet, one JSON object ``{mp_id: {frame_id: frame}}`` of about 11 GB.

Streamed, never loaded whole. Planning scans the file's bytes (memory-mapped) for the
top-level keys, ``"mp-123": {`` (a bare material id opening an object: frame ids carry a
``-calc-step`` tail, and ids as values are followed by ``}``, not ``: {``), and cuts the object
into work units of ``chunk_size`` materials. Each unit reads only its byte range and parses it
as a JSON object of its own, so a cut in the wrong place cannot pass unnoticed: it would not
parse, and is a ``SourceError`` naming the byte offset.

Per frame (units as the figshare description gives them, converted here):
``corrected_total_energy`` (eV, MP2020-corrected: the label CHGNet trains on, as a total) ->
``energy``, checked against ``energy_per_atom`` times the atom count; ``force`` (eV/Å) ->
``forces``; ``stress`` (kbar, VASP's sign: positive under compression) -> ``stress`` in eV/Å³
and ASE's sign; ``ef_per_atom`` (eV/atom) -> ``formation_energy_per_atom``; ``bandgap`` (eV) ->
``band_gap``. A missing stress, gap or formation energy leaves that target absent; magnetic
moments have no canonical column and are not kept.

``sample_id`` is the frame id; ``material_id`` and ``group`` are the material id, so every
frame of one material lands in one split (and the MatSciML id split applies by material).
"""

from __future__ import annotations

import mmap
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import orjson

from matsci_ray import keys
from matsci_ray.data.readers.base import SourceReader
from matsci_ray.data.readers.generic import convert_target
from matsci_ray.data.readers.lmdb_source import RecordRejected, optional_float
from matsci_ray.data.readers.materials_project import _structure
from matsci_ray.data.record import Record, Reject, SourceError, WorkUnit
from matsci_ray.data.units import stress_from_kbar_vasp

DEFAULT_CHUNK_SIZE = 200  # materials per work unit: about 2,000 frames, 15 MB of JSON
# A top-level key: a material id ("mp-1234", "mvc-56") that opens an object.
MATERIAL_KEY = re.compile(rb'"([a-z]+-\d+)"\s*:\s*\{')
_WHITESPACE = b" \t\r\n"
# The energy per atom is printed rounded; a larger gap means the two fields disagree.
_ENERGY_PER_ATOM_TOLERANCE = 1e-4  # eV/atom


def material_offsets(file: str) -> tuple[list[int], int]:
    """Byte offsets of every top-level key of ``file``, and of the object's closing brace."""
    try:
        with open(file, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
            opening, end = _content_bounds(data)
            if data[opening : opening + 1] != b"{" or data[end - 1 : end] != b"}":
                raise SourceError(file, "not one JSON object ({...}): not the MPtrj layout")
            offsets = [match.start() for match in MATERIAL_KEY.finditer(data, opening + 1, end)]
            head = data[opening + 1 : offsets[0]] if offsets else b""
    except (OSError, ValueError) as exc:
        raise SourceError(file, f"cannot read ({type(exc).__name__}: {exc})") from None
    if head.strip(_WHITESPACE):
        raise SourceError(file, "the object does not start with a material id: not MPtrj")
    return offsets, end - 1


def _content_bounds(data: mmap.mmap) -> tuple[int, int]:
    """Offset of the first and one past the last non-whitespace byte, from the file's ends
    only (stripping the whole map would copy 11 GB)."""
    head, tail = data[:4096], data[-4096:]
    return len(head) - len(head.lstrip(_WHITESPACE)), len(data) - len(tail) + len(
        tail.rstrip(_WHITESPACE)
    )


def plan_materials(source: str, file: str, chunk_size: int) -> list[WorkUnit]:
    """Byte ranges of ``chunk_size`` materials each, from one scan of the file."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    offsets, close = material_offsets(file)
    starts = offsets[::chunk_size]
    stops = [*starts[1:], close]
    return [WorkUnit(source, file, a, b) for a, b in zip(starts, stops, strict=True)]


def load_unit(unit: WorkUnit) -> dict[str, Any]:
    """The materials of one unit: its byte range parsed as one JSON object."""
    assert unit.stop is not None, "MPtrj units are byte ranges"
    try:
        with open(unit.file, "rb") as fh:
            fh.seek(unit.start)
            text = fh.read(unit.stop - unit.start).rstrip(_WHITESPACE).removesuffix(b",")
        doc = orjson.loads(b"{" + text + b"}")
    except (OSError, orjson.JSONDecodeError) as exc:
        message = f"bytes {unit.start}-{unit.stop} are not whole MPtrj materials ({exc})"
        raise SourceError(unit.file, message) from None
    if not isinstance(doc, dict):
        raise SourceError(unit.file, f"bytes {unit.start}-{unit.stop}: not a JSON object")
    return doc


class MPtrjReader(SourceReader):
    name: ClassVar[str] = "mptrj"
    dataset: ClassVar[str] = "mptrj"
    suffixes: ClassVar[tuple[str, ...]] = (".json",)
    targets: ClassVar[tuple[str, ...]] = (
        keys.ENERGY,
        keys.FORCES,
        keys.STRESS,
        keys.FORMATION_ENERGY,
        keys.BAND_GAP,
    )

    def __init__(self, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        self.chunk_size = chunk_size

    def plan(self, file: Path) -> list[WorkUnit]:
        return plan_materials(self.name, str(file), self.chunk_size)

    def read(self, unit: WorkUnit) -> Iterator[Record | Reject]:
        for material_id, frames in load_unit(unit).items():
            if not isinstance(frames, dict):
                yield Reject(unit.file, material_id, "not an object of frames")
                continue
            for frame_id, frame in frames.items():
                try:
                    yield frame_record(material_id, frame_id, frame, unit.file)
                except RecordRejected as exc:
                    yield Reject(unit.file, frame_id, str(exc))


def frame_record(material_id: str, frame_id: str, frame: Any, file: str) -> Record:
    """One MPtrj frame in canonical units; ``RecordRejected`` says why it cannot be."""
    if not isinstance(frame, dict):
        raise RecordRejected(f"frame is {type(frame).__name__}, not an object")
    if frame.get("mp_id", material_id) != material_id:
        raise RecordRejected(f"frame of {frame.get('mp_id')!r} filed under {material_id}")
    numbers, positions, cell, pbc = _structure(frame.get("structure"))
    return Record(
        dataset=MPtrjReader.dataset,
        sample_id=frame_id,
        atomic_numbers=numbers,
        positions=positions,
        cell=cell,
        pbc=pbc,
        targets=frame_targets(frame, len(numbers)),
        group=material_id,
        material_id=material_id,
        source_file=file,
        source_key=frame_id,
    )


def frame_targets(frame: dict[str, Any], natoms: int) -> dict[str, Any]:
    """The canonical targets of one frame (module docstring)."""
    energy = optional_float(frame.get("corrected_total_energy"), "corrected_total_energy")
    if energy is None:
        raise RecordRejected("no corrected_total_energy")
    per_atom = optional_float(frame.get("energy_per_atom"), "energy_per_atom")
    if per_atom is not None and abs(energy / natoms - per_atom) > _ENERGY_PER_ATOM_TOLERANCE:
        raise RecordRejected(
            f"corrected_total_energy / {natoms} atoms = {energy / natoms:.6f} eV/atom, "
            f"energy_per_atom says {per_atom:.6f}"
        )
    targets: dict[str, Any] = {keys.ENERGY: energy}
    try:
        targets[keys.FORCES] = convert_target(keys.TARGETS[keys.FORCES], frame.get("force"), natoms)
        if frame.get("stress") is not None:
            targets[keys.STRESS] = stress_from_kbar_vasp(frame["stress"])
    except ValueError as exc:
        raise RecordRejected(f"force or stress: {exc}") from None
    for name, field in ((keys.FORMATION_ENERGY, "ef_per_atom"), (keys.BAND_GAP, "bandgap")):
        value = optional_float(frame.get(field), field)
        if value is not None:
            targets[name] = value
    return targets


__all__ = ["MPtrjReader", "material_offsets", "plan_materials"]
