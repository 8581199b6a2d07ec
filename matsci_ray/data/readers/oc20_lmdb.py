"""OC20's LMDB releases: pickled ``torch_geometric`` ``Data`` records (IS2RE/IS2RS and S2EF).

The layout fairchem's ``LmdbDataset`` reads: one or more ``*.lmdb`` files per split directory
(``subdir=False``), values under ``b"0"``, ``b"1"``, … plus a ``length`` key (skipped: not a
record). Each value is a pickled ``Data`` in the PyG 1.x layout (the released IS2RE/IS2RS LMDBs)
or the 2.x one (LMDBs written since), read through the allow-list unpickler's stand-ins, so no
PyG code runs. A plain dict of the same fields is read alike. Fields:

- every record: ``sid`` (the system: the integer of OC20's ``random<sid>``), ``atomic_numbers``,
  ``pos`` (Å), ``cell`` (Å, ``1×3×3``), ``natoms``, ``tags``, ``fixed``; ``pbc`` where stored,
  else periodic along all three axes, as every OC20 slab is;
- IS2RE/IS2RS: ``y_relaxed`` (eV) and ``pos_relaxed`` (Å); ``y_init`` is not kept, as the
  trajectory reader keeps no initial energy either;
- S2EF: ``fid`` (the frame's index in its relaxation), the energy ``y`` (``energy`` in LMDBs
  fairchem wrote since 2024) and forces ``force`` (``forces``), in eV and eV/Å.

Energies are stored as the LMDB holds them, and which kind that is varies: the IS2RE/IS2RS
release holds *adsorption* energies (the DFT total minus the clean slab's and the gas-phase
references; fairchem's IS2RE configs normalise them with mean -1.53 eV), S2EF LMDBs hold them
when fairchem's preprocessing ran with ``--ref-energy`` and raw totals otherwise, and the
trajectory and extxyz inputs hold raw totals. No field says which, so :func:`energy_reference`
tells them apart by size per atom, and :func:`check_one_energy_reference` refuses an ingest whose
inputs disagree: a data set never mixes the two kinds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from matsci_ray import keys
from matsci_ray.data.readers.lmdb_source import RecordRejected, count_records, iter_lmdb_values
from matsci_ray.data.record import Record, Reject, SourceError, WorkUnit
from matsci_ray.data.safe_pickle import PygData

log = logging.getLogger(__name__)

LMDB_SUFFIX = ".lmdb"
S2EF_ENERGY_FIELDS = ("energy", "y")  # fairchem's name since 2024 first, then OCP's
S2EF_FORCE_FIELDS = ("forces", "force")
IS2RE_ENERGY_FIELDS = ("y_relaxed",)

EnergyReference = Literal["adsorption", "total"]
# An input's energies count as adsorption energies when their median size per atom is below
# this. OC20 adsorption energies lie within ±10 eV for systems of 20-200 atoms (hundredths of
# an eV per atom); raw VASP totals of the sample systems lie between -1.4 (NaTl) and
# -8.3 eV/atom (Mo, Rh oxides). Totals of Hg- or Cd-rich slabs come closest to the line.
_ADSORPTION_MAX_PER_ATOM = 0.5  # eV/atom
_PROBE_RECORDS = 32  # records sampled, spread over the file


def is_lmdb(path: str | Path) -> bool:
    return str(path).endswith(LMDB_SUFFIX)


def record_fields(value: Any, file: str, key: str) -> dict[str, Any]:
    """The fields of one unpickled record: a PyG ``Data`` stand-in or a plain dict."""
    if isinstance(value, PygData):
        return value.as_dict()
    if isinstance(value, dict):
        return value
    raise SourceError(file, f"record is a {type(value).__name__}, not a PyG Data", key)


# --- field conversion -----------------------------------------------------------------------


def _numpy(value: Any, name: str) -> np.ndarray:
    if value is None:
        raise RecordRejected(f"no {name}")
    if hasattr(value, "detach"):  # a torch tensor; detached in case it was saved with grad
        value = value.detach()
    try:
        array = np.asarray(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise RecordRejected(f"unreadable {name} ({type(exc).__name__})") from None
    if array.dtype.kind not in "biuf":
        raise RecordRejected(f"{name} is not numeric (dtype {array.dtype})")
    return array


def _integers(value: Any, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Integer array of ``shape``; OCP's early preprocessing stored integers as floats."""
    array = _numpy(value, name)
    if array.shape != shape:
        raise RecordRejected(f"{name} has shape {array.shape}, expected {shape}")
    if array.dtype.kind == "f" and not np.array_equal(array, np.round(array)):
        raise RecordRejected(f"{name} holds non-integer values")
    return array.astype(np.int64)


def _vectors(value: Any, name: str, n: int) -> np.ndarray:
    array = _numpy(value, name).astype(np.float64)
    if array.shape != (n, 3):
        raise RecordRejected(f"{name} has shape {array.shape}, expected ({n}, 3)")
    return array


def _scalar(value: Any, name: str) -> float:
    array = _numpy(value, name)
    if array.size != 1:
        raise RecordRejected(f"{name} has {array.size} values, expected one")
    return float(array.reshape(-1)[0])


def _first(fields: dict[str, Any], names: Sequence[str]) -> Any:
    return next((fields[name] for name in names if fields.get(name) is not None), None)


def _cell(value: Any) -> np.ndarray:
    """``(3, 3)`` from OCP's ``(1, 3, 3)`` (a batch of one, for collation) or ``(3, 3)``."""
    cell = _numpy(value, "cell").astype(np.float64)
    if cell.shape not in ((1, 3, 3), (3, 3)):
        raise RecordRejected(f"cell has shape {cell.shape}, expected (1, 3, 3) or (3, 3)")
    return cell.reshape(3, 3)


def _pbc(value: Any) -> np.ndarray:
    if value is None:
        return np.ones(3, dtype=bool)
    pbc = _numpy(value, "pbc").reshape(-1)
    if pbc.shape != (3,):
        raise RecordRejected(f"pbc has {pbc.size} values, expected 3")
    return pbc.astype(bool)


def structure(fields: dict[str, Any]) -> dict[str, Any]:
    """``atomic_numbers``, ``positions``, ``cell``, ``pbc`` as canonical ``Record`` fields."""
    z = _numpy(fields.get("atomic_numbers"), "atomic_numbers")
    if z.ndim != 1:
        raise RecordRejected(f"atomic_numbers has shape {z.shape}, expected (n,)")
    n = len(z)
    numbers = _integers(z, "atomic_numbers", (n,))
    natoms = fields.get("natoms")
    if natoms is not None and _scalar(natoms, "natoms") != n:
        raise RecordRejected(f"natoms is {_scalar(natoms, 'natoms'):g} but {n} atoms are given")
    return {
        "atomic_numbers": numbers,
        "positions": _vectors(fields.get("pos"), "pos", n),
        "cell": _cell(fields.get("cell")),
        "pbc": _pbc(fields.get("pbc")),
    }


def system_id(value: Any) -> str:
    """OC20's system id: ``random<sid>`` for the integer ``sid`` OCP stores, as the trajectory
    files are named; a string ``sid`` is kept as it is."""
    if isinstance(value, str) and value:
        return value
    if value is None:
        raise RecordRejected("no sid (the system id that keeps a system in one split)")
    sid = _integers(_numpy(value, "sid").reshape(-1), "sid", (1,))
    return f"random{sid[0]}"


def _frame_id(value: Any) -> int:
    if value is None:
        raise RecordRejected("no fid (the frame's index in its relaxation)")
    if isinstance(value, str):
        digits = value.removeprefix("frame")
        if not digits.isdigit():
            raise RecordRejected(f"fid {value[:30]!r} is not a frame number")
        return int(digits)
    return int(_integers(_numpy(value, "fid").reshape(-1), "fid", (1,))[0])


def atom_labels(fields: dict[str, Any], n: int) -> dict[str, Any]:
    """``fixed`` (bool) and ``tags`` targets, where stored.

    All-zero tags are left out: ``AtomsToGraphs`` writes zeros for a structure that had no
    tags, and every real OC20 adslab has surface (1) and adsorbate (2) atoms.
    """
    labels: dict[str, Any] = {}
    if fields.get("fixed") is not None:
        fixed = _integers(fields["fixed"], "fixed", (n,))
        if not np.isin(fixed, (0, 1)).all():
            raise RecordRejected("fixed holds values other than 0 and 1")
        labels[keys.FIXED] = fixed.astype(bool)
    if fields.get("tags") is not None:
        tags = _integers(fields["tags"], "tags", (n,))
        if tags.any():
            labels[keys.TAGS] = tags
    return labels


# --- records ----------------------------------------------------------------------------------


def s2ef_record(fields: dict[str, Any], dataset: str, file: str, key: str) -> Record:
    """One S2EF frame; ``sample_id`` ``random<sid>:<fid>`` as from an extxyz with its sidecar."""
    geometry = structure(fields)
    n = len(geometry["atomic_numbers"])
    system = system_id(fields.get("sid"))
    frame = _frame_id(fields.get("fid"))
    energy = _first(fields, S2EF_ENERGY_FIELDS)
    if energy is None:
        raise RecordRejected("no energy (y): an unlabelled split, such as S2EF test?")
    targets: dict[str, Any] = {
        keys.ENERGY: _scalar(energy, "energy"),
        keys.FORCES: _vectors(_first(fields, S2EF_FORCE_FIELDS), "forces", n),
        **atom_labels(fields, n),
    }
    return Record(
        dataset=dataset,
        sample_id=f"{system}:{frame}",
        group=system,
        targets=targets,
        source_file=file,
        source_key=key,
        **geometry,
    )


def is2re_record(fields: dict[str, Any], dataset: str, file: str, key: str) -> Record:
    """One relaxation: the initial structure, its relaxed energy and positions where stored."""
    geometry = structure(fields)
    n = len(geometry["atomic_numbers"])
    system = system_id(fields.get("sid"))
    if fields.get("y_relaxed") is None:
        raise RecordRejected("no y_relaxed: an unlabelled split, such as IS2RE test?")
    targets: dict[str, Any] = {keys.RELAXED_ENERGY: _scalar(fields["y_relaxed"], "y_relaxed")}
    if fields.get("pos_relaxed") is not None:
        targets[keys.RELAXED_POSITIONS] = _vectors(fields["pos_relaxed"], "pos_relaxed", n)
    targets.update(atom_labels(fields, n))
    return Record(
        dataset=dataset,
        sample_id=system,
        group=system,
        targets=targets,
        source_file=file,
        source_key=key,
        **geometry,
    )


RecordBuilder = Callable[[dict[str, Any], str, str, str], Record]


def read_oc20_lmdb(unit: WorkUnit, dataset: str, build: RecordBuilder) -> Iterator[Record | Reject]:
    """Stream one LMDB work unit (planned with ``plan_lmdb``) through ``build``."""
    for key, value in iter_lmdb_values(unit):
        fields = record_fields(value, unit.file, key)
        try:
            yield build(fields, dataset, unit.file, key)
        except RecordRejected as exc:
            yield Reject(unit.file, key, str(exc))


# --- which energies an input holds --------------------------------------------------------------


def energy_reference(
    file: str | Path, energy_fields: Sequence[str]
) -> tuple[EnergyReference, float] | None:
    """``(kind, median energy per atom)`` of an LMDB's energies, from up to 32 records spread
    over the file; ``None`` when none of them has an energy (an unlabelled test split)."""
    path = str(file)
    stride = max(1, count_records(path) // _PROBE_RECORDS)
    per_atom: list[float] = []
    for key, value in iter_lmdb_values(WorkUnit("probe", path), stride):
        fields = record_fields(value, path, key)
        try:
            energy = _scalar(_first(fields, energy_fields), "energy")
            n = len(_numpy(fields.get("atomic_numbers"), "atomic_numbers").reshape(-1))
        except RecordRejected:
            continue  # the read rejects it, naming why
        if n and np.isfinite(energy):
            per_atom.append(energy / n)
    if not per_atom:
        return None
    median = float(np.median(per_atom))
    return ("adsorption" if abs(median) < _ADSORPTION_MAX_PER_ATOM else "total"), median


def _describe(kind: EnergyReference, median: float | None) -> str:
    if median is None:  # a trajectory or extxyz input
        return "holds raw DFT total energies (a trajectory or extxyz file)"
    return f"holds {kind} energies (median {median:+.3f} eV/atom)"


def check_one_energy_reference(files: Sequence[Path], energy_fields: Sequence[str]) -> None:
    """Refuse inputs whose energies are of both kinds (adsorption and total); log the kind.

    Trajectory and extxyz inputs always hold raw totals; each LMDB is judged by
    :func:`energy_reference`.
    """
    first: dict[EnergyReference, tuple[Path, float | None]] = {}
    for file in files:
        found: tuple[EnergyReference, float | None] | None = ("total", None)
        if is_lmdb(file):
            found = energy_reference(file, energy_fields)
        if found is not None:
            first.setdefault(found[0], (file, found[1]))
    if len(first) == 2:
        (ads_file, ads_median), (total_file, total_median) = first["adsorption"], first["total"]
        raise SourceError(
            str(ads_file),
            f"{_describe('adsorption', ads_median)} but {total_file} "
            f"{_describe('total', total_median)}: one data set holds one kind, so ingest them "
            "separately",
        )
    if "adsorption" in first:
        log.info(
            "the LMDB energies are adsorption energies (referenced to slab and gas); they are "
            "stored as given, not as DFT totals"
        )
