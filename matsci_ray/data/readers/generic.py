"""Any structure file ASE can read, with targets named by the user (``--target NAME=KEY``).

``NAME`` is a canonical target (``matsci_ray.keys.TARGETS``); ``KEY`` is where ASE put the
value: the calculator's stored results (ASE >= 3.23 moves an extxyz ``energy``, ``forces``,
``free_energy``, ``stress`` there), else ``atoms.info``, else ``atoms.arrays``. The user
vouches for units: the value must already be in the target's unit (eV, eV/Å, eV/Å³, …); only
its shape and type are checked here, its range by validation. A ``stress`` may be ASE's 6 Voigt
components or a 3×3 tensor (extxyz ``stress=`` holds 9 numbers).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from ase import Atoms

from matsci_ray import keys
from matsci_ray.data.readers.ase_frames import (
    DEFAULT_CHUNK_SIZE,
    calc_results,
    iter_frames,
    plan_frames,
    raw_forces,
    structure_fields,
)
from matsci_ray.data.readers.base import SourceReader
from matsci_ray.data.record import Record, Reject, WorkUnit
from matsci_ray.data.units import as_voigt

# The dataset name becomes a directory under the output: no separators, no "..".
_DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def lookup(atoms: Atoms, key: str) -> Any:
    """The value stored under ``key`` for ``atoms``, or ``None``.

    ``forces`` are taken as stored: ``atoms.get_forces()`` would zero them on fixed atoms.
    """
    if key == "forces":
        return raw_forces(atoms)
    results = calc_results(atoms)
    for store in (results, atoms.info, atoms.arrays):
        if key in store:
            return store[key]
    return None


def convert_target(spec: keys.TargetSpec, value: Any, natoms: int) -> Any:
    """``value`` as ``spec``'s kind wants it; ``ValueError`` says why it does not fit."""
    try:
        array = np.asarray(value)
    except Exception as exc:  # ragged lists and the like
        raise ValueError(f"not an array ({type(exc).__name__})") from None
    if array.dtype.kind not in "biuf":
        raise ValueError(f"not numeric (dtype {array.dtype})")
    kind = spec.kind
    if kind == "voigt":  # ASE's 6 Voigt components, or a 3×3 tensor
        if array.dtype.kind == "b":
            raise ValueError("boolean where a number is expected")
        return as_voigt(array)
    if kind in ("scalar", "bool", "class"):
        if array.size != 1:
            raise ValueError(f"expected one value, got shape {array.shape}")
        array = array.reshape(())
    elif kind == "per_atom_vector":
        if array.shape != (natoms, 3):
            raise ValueError(f"shape {array.shape}, expected ({natoms}, 3)")
    elif array.shape != (natoms,):
        raise ValueError(f"shape {array.shape}, expected ({natoms},)")

    if kind in ("scalar", "per_atom_vector"):
        if array.dtype.kind == "b":
            raise ValueError("boolean where a number is expected")
        return float(array) if kind == "scalar" else array.astype(np.float64)
    if kind in ("per_atom_int", "class"):
        if array.dtype.kind == "f" and not np.all(np.isfinite(array) & (array == np.round(array))):
            raise ValueError("not whole numbers")
        as_int = array.astype(np.int64)
        return int(as_int) if kind == "class" else as_int
    # "bool", "per_atom_bool": bools, or integers 0/1
    if array.dtype.kind != "b" and not np.all((array == 0) | (array == 1)):
        raise ValueError("not boolean (expected True/False or 0/1)")
    as_bool = array.astype(bool)
    return bool(as_bool) if kind == "bool" else as_bool


class GenericASEReader(SourceReader):
    """Frames of ASE-readable files; ``sample_id`` ``"<input id>:<frame>"`` (``WorkUnit``).

    ``group="frame"`` (default) lets frames of one file land in different splits, right for
    files of independent structures; use ``group="file"`` for a file that is one trajectory.
    """

    name: ClassVar[str] = "generic"
    dataset: ClassVar[str] = "generic"
    suffixes: ClassVar[tuple[str, ...]] = (
        ".traj",
        ".extxyz",
        ".xyz",
        ".extxyz.xz",
        ".extxyz.gz",
        ".xyz.xz",
        ".xyz.gz",
    )
    targets: ClassVar[tuple[str, ...]] = tuple(keys.TARGETS)

    def __init__(
        self,
        targets: Mapping[str, str],
        dataset: str = "generic",
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        group: Literal["frame", "file"] = "frame",
    ) -> None:
        if not targets:
            raise ValueError("the generic reader needs at least one target NAME=KEY")
        unknown = [name for name in targets if name not in keys.TARGETS]
        if unknown:
            raise ValueError(
                f"unknown target(s) {', '.join(map(repr, unknown))}; "
                f"allowed: {', '.join(keys.TARGETS)}"
            )
        empty = [name for name, key in targets.items() if not key]
        if empty:
            raise ValueError(f"empty ASE key for target(s) {', '.join(empty)}")
        if not _DATASET_NAME.fullmatch(dataset):
            raise ValueError(f"dataset name {dataset!r}: use letters, digits, '.', '_', '-'")
        if group not in ("frame", "file"):
            raise ValueError(f"group must be 'frame' or 'file', got {group!r}")
        self.target_keys = dict(targets)
        # Per instance: this reader's data set name and targets are the user's, not fixed.
        self.dataset = dataset  # type: ignore[misc]
        self.targets = tuple(targets)  # type: ignore[misc]
        self.chunk_size = chunk_size
        self.group = group

    def plan(self, file: Path) -> list[WorkUnit]:
        return plan_frames(self.name, file, self.chunk_size)

    def read(self, unit: WorkUnit) -> Iterator[Record | Reject]:
        prefix = unit.sample_prefix
        for index, atoms in iter_frames(unit.file, unit.start, unit.stop):
            key = str(index)
            n = len(atoms)
            targets: dict[str, Any] = {}
            problem = None
            for name, ase_key in self.target_keys.items():
                value = lookup(atoms, ase_key)
                if value is None:
                    problem = f"{name}: no {ase_key!r} in calculator results, info or arrays"
                    break
                try:
                    targets[name] = convert_target(keys.TARGETS[name], value, n)
                except ValueError as exc:
                    problem = f"{name} (from {ase_key!r}): {exc}"
                    break
            if problem is not None:
                yield Reject(unit.file, key, problem)
                continue
            sample_id = f"{prefix}:{index}"
            yield Record(
                dataset=self.dataset,
                sample_id=sample_id,
                group=sample_id if self.group == "frame" else prefix,
                targets=targets,
                source_file=unit.file,
                source_key=key,
                **structure_fields(atoms),
            )
